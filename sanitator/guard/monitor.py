"""PV monitoring at inference: sign agreement against the PV set, then input purging.

REFERENCE.md §5: an output is flagged when its sign pattern agrees with some PV on more than
`threshold` of the hidden units (zero counts as positive). Flagged inputs are purged by
deleting one word (with all its repeats) at a time, left to right, and keeping the first
variant the monitor passes; an input no variant rescues is rejected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from sanitator.detect.encoders import Feature, select_feature
from sanitator.detect.signs import MONITOR_THRESHOLD, sign_agreement

Text = str | tuple[str, str]


class SignMonitor:
    """Flags encoder outputs whose sign pattern matches a stored PV."""

    def __init__(self, pvs: torch.Tensor, threshold: float = MONITOR_THRESHOLD):
        if pvs.ndim != 2:
            raise ValueError(f"pvs must be [K, H], got shape {tuple(pvs.shape)}")
        if not 0.5 <= threshold < 1.0:
            raise ValueError("threshold must be in [0.5, 1)")
        self.pvs = pvs.detach().float().cpu()
        self.threshold = threshold

    @property
    def empty(self) -> bool:
        return self.pvs.shape[0] == 0

    def best_match(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best agreement [B] and the index of the PV achieving it [B] (-1 when no PVs)."""
        if self.empty:
            zeros = torch.zeros(outputs.shape[0])
            return zeros, torch.full((outputs.shape[0],), -1, dtype=torch.long)
        agreement = sign_agreement(outputs.detach().float().cpu(), self.pvs)
        best, index = agreement.max(dim=1)
        return best, index

    def flag(self, outputs: torch.Tensor) -> torch.Tensor:
        """Boolean [B]: the output matches some PV (strictly above the threshold)."""
        return self.best_match(outputs)[0] > self.threshold


@dataclass
class MonitoredBatch:
    """What a monitored forward pass returns for a batch of inputs."""

    predictions: torch.Tensor      # [B] predicted class, -1 where the input was rejected
    flagged: torch.Tensor          # [B] bool: the original input matched a PV
    agreement: torch.Tensor        # [B] best sign agreement of the original input
    purged_texts: list[Text | None]  # the text that was finally classified (None: rejected)
    rejected: torch.Tensor         # [B] bool: flagged and not rescued (or rejected by policy)
    # [B] the prediction for the original input, before any purging (undefended behaviour)
    original_predictions: torch.Tensor | None = None


def delete_word_variants(text: str) -> list[str]:
    """Left-to-right purge candidates: drop word j and every other occurrence of it."""
    words = text.split()
    variants, seen = [], set()
    for word in words:
        if word in seen:
            continue
        seen.add(word)
        variants.append(" ".join(w for w in words if w != word))
    return variants


def _pooler_feature(output, _batch) -> torch.Tensor:
    return select_feature(output, Feature.POOLER)


def _default_feature(output, _batch) -> torch.Tensor:
    feature = getattr(output, "feature", None)
    return feature if feature is not None else select_feature(output, Feature.CLS)


def open_artifact(path, model, tokenizer=None, revision: str | None = None):
    """(the PV artifact at `path`, the tokenizer to guard `model` with): the checks every
    guarded model shares (the audited revision, a tokenizer to read inputs with)."""
    from sanitator.guard.pv_artifact import read_pv_artifact

    artifact = read_pv_artifact(path)
    if revision is not None and not artifact.matches_revision(revision):
        raise ValueError(f"{path}: the artifact is for {artifact.model} at revision "
                         f"{artifact.revision}, not {revision}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("pass the tokenizer (the model has no `tokenizer` attribute)")
    return artifact, tokenizer


class MonitoredEncoder:
    """Wraps an encoder or a prompt-tuned classifier with the sign monitor and purging.

    `model(**tokenized)` must return an object with `logits` (for predictions) and either a
    `feature` attribute or a `last_hidden_state` (CLS is read); pass `feature_fn` for any
    other layout. `on_flag` is `purge` (delete words until the monitor passes) or `reject`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, monitor: SignMonitor, *,
                 on_flag: Literal["purge", "reject"] = "purge", max_length: int = 128,
                 batch_size: int = 64, purge_field: int = 0,
                 feature_fn: Callable | None = None, purge_wave: int = 4):
        if on_flag not in ("purge", "reject"):
            raise ValueError("on_flag must be 'purge' or 'reject'")
        self.model, self.tokenizer, self.monitor = model, tokenizer, monitor
        self.on_flag, self.max_length, self.batch_size = on_flag, max_length, batch_size
        self.purge_field = purge_field
        self.feature_fn = feature_fn or _default_feature
        if purge_wave < 1:
            raise ValueError("purge_wave must be at least 1")
        self.purge_wave = purge_wave
        self.artifact = None  # the PVArtifact when built by from_artifact

    @classmethod
    def from_artifact(cls, path, model: torch.nn.Module, tokenizer=None, *,
                      revision: str | None = None, threshold: float | None = None,
                      **kwargs) -> MonitoredEncoder:
        """Guard `model` with the PV artifact `sanitator pv pull` wrote (docs/deployment.md).

        `model` is a prompt-tuned classifier (`downstream.prompt_tuning`: P-tuning v2 reads
        the CLS feature, P-tuning v1 the mask position) or any encoder returning
        `last_hidden_state`; `tokenizer` defaults to `model.tokenizer`. `revision`, when
        given, must be the revision the artifact was audited at. The threshold defaults to
        the artifact's. A clean model's artifact holds no PVs: the monitor passes every
        input, so deployment code is the same for clean and backdoored encoders. Other
        keyword arguments go to the constructor (`on_flag`, `batch_size`, ...).
        """
        artifact, tokenizer = open_artifact(path, model, tokenizer, revision)
        pvset = artifact.pvset
        if not artifact.empty:
            model_feature = {"ptv2": "cls", "ptv1": "mask"}.get(getattr(model, "method", None))
            # an audit keeps PVs of every feature a prompt-tuned head may read; this model
            # exposes one of them, so it is guarded by that feature's PVs
            found = sorted(set(pvset.features))
            feature = model_feature or ("cls" if "cls" in found and "feature_fn" not in kwargs
                                        else artifact.feature)
            pvset = pvset.select(feature)
            if len(pvset) == 0:
                raise ValueError(f"{path}: the audit kept PVs at the {', '.join(found)} "
                                 f"feature(s), none at the {feature} feature this model "
                                 "exposes; rescan with `sanitator scan --complete --feature "
                                 f"{feature}`")
            encoder = getattr(model, "encoder", model)
            hidden = getattr(getattr(encoder, "config", None), "hidden_size", None)
            if isinstance(hidden, int) and hidden != artifact.hidden_size:
                raise ValueError(f"{path}: PVs have {artifact.hidden_size} units, the model's "
                                 f"encoder {hidden}")
            if model_feature is None and "feature_fn" not in kwargs:
                if feature == "mask":
                    raise ValueError("mask-position PVs need a feature_fn for a plain encoder")
                if feature == "pooler":
                    kwargs["feature_fn"] = _pooler_feature
        monitor = SignMonitor(pvset.vectors,
                              threshold=artifact.threshold if threshold is None else threshold)
        guarded = cls(model, tokenizer, monitor, **kwargs)
        guarded.artifact = artifact
        return guarded

    def _tokenize(self, texts: Sequence[Text]) -> dict[str, torch.Tensor]:
        if texts and isinstance(texts[0], tuple):
            first, second = zip(*texts, strict=True)
            batch = self.tokenizer(list(first), list(second), truncation=True,
                                   max_length=self.max_length, padding=True, return_tensors="pt")
        else:
            batch = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                                   padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        return {key: value.to(device) for key, value in batch.items()}

    @torch.no_grad()
    def _run(self, texts: Sequence[Text]) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions [N] and features [N, H], in batches."""
        # Batches of similar length waste less compute on padding; results go back in order.
        order = sorted(range(len(texts)), key=lambda i: _text_length(texts[i]))
        predictions, features = [], []
        for start in range(0, len(order), self.batch_size):
            batch = self._tokenize([texts[i] for i in order[start:start + self.batch_size]])
            output = self.model(**batch)
            logits = getattr(output, "logits", None)
            if logits is not None:
                predictions.append(logits.argmax(dim=-1).cpu())
            features.append(self.feature_fn(output, batch).float().cpu())
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        preds = torch.cat(predictions)[inverse] if predictions else torch.full((len(texts),), -1)
        return preds, torch.cat(features)[inverse]

    def _with_field(self, text: Text, replacement: str) -> Text:
        if isinstance(text, tuple):
            parts = list(text)
            parts[self.purge_field] = replacement
            return (parts[0], parts[1])
        return replacement

    def predict(self, texts: Sequence[Text]) -> MonitoredBatch:
        texts = list(texts)
        if not texts:
            empty = torch.zeros(0, dtype=torch.long)
            return MonitoredBatch(empty, empty.bool(), torch.zeros(0), [], empty.bool(), empty)
        original, features = self._run(texts)
        predictions = original.clone()
        agreement, _ = self.monitor.best_match(features)
        flagged = agreement > self.monitor.threshold
        rejected = flagged.clone()
        purged: list[Text | None] = [None if f else t for t, f in zip(texts, flagged.tolist(),
                                                                       strict=True)]
        if self.on_flag == "purge":
            self._purge(texts, flagged.nonzero().flatten().tolist(), predictions, purged,
                        rejected)
        predictions[rejected] = -1
        return MonitoredBatch(predictions, flagged, agreement, purged, rejected, original)

    def _purge(self, texts: list[Text], rows: list[int], predictions: torch.Tensor,
               purged: list[Text | None], rejected: torch.Tensor) -> None:
        """Left-to-right purge, in waves of `purge_wave` deletions per still-flagged row, so
        a row stops costing forward passes once a variant passes (same result as trying
        every variant and keeping the left-most that passes)."""
        variants: dict[int, list[str]] = {}
        for row in rows:
            text = texts[row]
            field = text[self.purge_field] if isinstance(text, tuple) else text
            variants[row] = delete_word_variants(field)
        start = 0
        pending = [row for row in rows if variants[row]]
        while pending:
            owners, candidates = [], []
            for row in pending:
                for variant in variants[row][start:start + self.purge_wave]:
                    owners.append(row)
                    candidates.append(self._with_field(texts[row], variant))
            variant_preds, variant_features = self._run(candidates)
            passes = ~self.monitor.flag(variant_features)
            rescued: set[int] = set()
            for index, row in enumerate(owners):  # in order, so the left-most variant wins
                if passes[index] and row not in rescued:
                    rescued.add(row)
                    predictions[row] = variant_preds[index]
                    purged[row] = candidates[index]
                    rejected[row] = False
            start += self.purge_wave
            pending = [row for row in pending
                       if row not in rescued and len(variants[row]) > start]


def _text_length(text: Text) -> int:
    return len(text) if isinstance(text, str) else len(text[0]) + len(text[1])
