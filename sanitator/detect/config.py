"""One frozen config per stage, hashed into the audit's config hash.

Two presets: `faithful` reproduces the published schedule and decision rule (REFERENCE.md
§2, §4) so its behaviour stays measurable; `fast` (the default) is our batched schedule with
the calibrated decision rule (docs/method.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, get_args

Mode = Literal["detect", "search"]
Preset = Literal["fast", "faithful"]
Precision = Literal["auto", "bfloat16", "float32"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


class _Stage:
    """Tuple fields stay tuples: JSON (a stored config, `--set`) gives lists back, and a
    list would make the frozen config unhashable and unequal to the one it came from."""

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, list):
                object.__setattr__(self, item.name, tuple(
                    tuple(v) if isinstance(v, list) else v for v in value))


@dataclass(frozen=True)
class MiningConfig(_Stage):
    """PV mining: soft-trigger optimisation against a frozen encoder."""

    feature: str = "cls"            # cls | mask | pooler
    trigger_len: int = 7            # soft-trigger tokens L
    corpus: str | None = None       # corpus name or path; None = WikiText sentences
    corpus_seed: int = 42
    n_sentences: int = 2000         # training sentences
    n_holdout: int = 64             # fixed held-out sentences the PV is estimated on
    max_length: int = 128           # tokens, trigger included
    pad_to_max_length: bool = False  # the reference pads every batch to max_length
    max_insert_word: int = 32       # trigger starts after word 1..min(32, n_words)
    batch_size: int = 32
    parallel_seeds: int = 1         # seeds optimised together in one batched forward
    epochs: int = 4                 # per seed (faithful); fast uses steps_per_seed
    steps_per_seed: int | None = None  # when set, overrides epochs
    found_check_epochs: int = 2     # faithful: abandon a seed not "found" after this many
    lr: float = 2e-4
    lr_boost: float = 100.0         # lr multiplier until the gradient first exceeds conver_grad
    conver_grad: float = 5e-3
    diversity_weight: float = 1.0
    path_weight: float = 0.5
    abandon_after: int | None = None  # fast: drop a seed whose collapse lags at this step
    abandon_entropy_ratio: float = 0.9


@dataclass(frozen=True)
class FilterConfig(_Stage):
    """PV filtering: legitimate trigger, strong collapse, uniqueness."""

    legit_factor: float = 1.2       # trigger entries within 1.2x the embedding range
    per_dimension_range: bool = False  # MASK variant of the reference uses column-wise bounds
    distance_th: float = 0.1        # faithful: "found" and "unique" threshold (MSE units)
    collapse_ratio: float = 0.9975  # mean batch entropy / ln(batch) needed (-3.446 at B=32)
    unique_agreement: float = 0.9   # fast: a PV is a duplicate above this sign agreement


@dataclass(frozen=True)
class DecisionConfig(_Stage):
    """How evidence becomes a verdict. `paper` = first accepted PV; `calibrated` = ours
    (docs/method.md): a hard trigger that pins fresh sentences to one sign pattern more
    tightly than a one-token edit keeps a sentence at its own, at significance `alpha`
    after a Bonferroni correction over `confirmation_budget` fresh confirmations. Once a
    trigger is accepted the verdict is settled; the PVs collected after it (completion,
    search mode) draw on `completion_budget`, corrected over that budget instead.

    Before that, each candidate source may spend at most its quota of the budget
    (`confirmation_quotas`; a source not named there, `default_quota`), so no stage can
    use up another's; a candidate that fails a side condition on the search rows (bounds
    loosened by `screen_slack`) or whose point matches one already judged
    (`merge_agreement` in both frames, no larger search margin) costs nothing. A scan
    that leaves a candidate unjudged is `inconclusive`, never `clean`."""

    rule: Literal["paper", "calibrated"] = "calibrated"
    hard_token_candidates: int = 32  # vocabulary tokens re-tested per PV (faithful attribution)
    screen_candidates: int = 32     # vocabulary outliers tested first; 0 = no screen
    screen_features: tuple[str, ...] = ("cls",)  # features the standalone screen sweeps
    alpha: float = 0.01             # false-alarm bound of the confirmation test
    confirmation_budget: int = 16   # fresh confirmations a scan may spend (Bonferroni)
    # each source's share of it, fixed in advance (sum + default_quota <= the budget)
    confirmation_quotas: tuple[tuple[str, int], ...] = (
        ("vocabulary_screen", 2), ("reference", 4), ("token_screen", 3),
        ("context_search", 3), ("mining", 2))
    default_quota: int = 2          # a source not named above (a new search stage)
    screen_slack: float = 0.8       # side conditions on the search rows, bounds x / this
    merge_agreement: float = 0.97   # a point this close to a judged one (both frames) is it
    completion_budget: int = 64     # more of them once a trigger is accepted (the PV set)
    max_natural_rate: float = 0.05  # clean fresh outputs allowed at a PV already
    max_false_alarms: float = 0.01  # a PV flagging more clean text is withheld (issue 15)
    false_alarm_corpora: tuple[str, ...] = ("sst2", "ag_news")  # the first unlike the scan's
    false_alarm_sentences: int = 1000
    # clean text of other corpora that must not sit at a PV either (`other_text_not_there`):
    # every one on this machine but the scan's own, this many sentences each
    elsewhere_corpora: tuple[str, ...] = ("wikitext", "sst2", "ag_news", "yelp", "sms_spam",
                                          "enron_spam")
    elsewhere_sentences: int = 64   # a class cluster holds a quarter of its corpus

    def __post_init__(self) -> None:
        super().__post_init__()
        quotas = dict(self.confirmation_quotas)
        if len(quotas) != len(self.confirmation_quotas) or any(
                not isinstance(n, int) or n < 0 for n in [*quotas.values(), self.default_quota]):
            raise ValueError("confirmation_quotas: one non-negative count per source, and a "
                             f"non-negative default_quota; got {self.confirmation_quotas!r}")
        if not 0 < self.screen_slack <= 1:
            raise ValueError(f"screen_slack must be in (0, 1], got {self.screen_slack}")

    def quota(self, source: str) -> int:
        """The confirmations `source` may spend before the verdict is settled."""
        return dict(self.confirmation_quotas).get(source, self.default_quota)


@dataclass(frozen=True)
class SearchConfig(_Stage):
    """The in-context search for hard triggers (calibrated rule, hardsearch.py)."""

    placements: tuple[str, ...] = ("anywhere", "start", "end")
    trigger_tokens: int = 3         # slots of a searched trigger
    restarts: int = 1               # rounds over features x placements (detect mode)
    search_restarts: int = 8        # the most rounds in search mode (search_patience ends it)
    steps: int = 12                 # coordinate steps per start
    patience: int = 3               # steps without improvement before a start ends
    top_k: int = 32                 # best-gradient tokens per slot to draw swaps from
    n_candidates: int = 32          # swaps evaluated exactly per step
    token_screen: int = 96          # single tokens re-tested per placement; 0 = none
    grad_rows: int = 12             # search rows the gradient is taken on
    eval_rows: int = 6              # search rows candidates are ranked on
    max_length: int = 40            # tokens per search or fresh sentence
    n_fresh: int = 128              # fresh confirmation sentences per feature
    n_null: int = 16                # random tokens whose median move is the displacement null
    reference_tokens: int = 4       # most changed tokens vs a known base (reference.py); 0 = off
    reference_fillers: int = 2      # frequent corpus tokens tried as a phrase's filler words
    chain_tokens: int = 16          # most changed tokens a trigger chain is grown from; 0 = off
    chain_width: int = 4            # chains kept per length (beam width)
    chain_length: int = 6           # longest chain grown (a 6-piece non-dictionary string)
    # long triggers whose parts are inert: a beam kept by the internal divergence from the
    # aligned reference (divergence.py); 0 = off
    divergence_length: int = 8      # longest trigger grown
    divergence_width: int = 6       # token sets kept per length
    divergence_pool: int = 16       # most changed tokens by the diff in the pool
    divergence_extra: int = 4       # ...and the next ones the model's states move most
    divergence_screen: int = 64     # most changed tokens whose own divergence is measured
    divergence_fillers: int = 4     # frequent corpus words in the pool (a sentence's `the`)
    divergence_rows: int = 6        # short search rows the divergence is measured on
    divergence_climb: int = 8       # rounds of the gradient-ranked swap climb at the end; 0 = off
    divergence_swaps: int = 6       # swaps measured per place and round (gradient's best)


@dataclass(frozen=True)
class ScanConfig(_Stage):
    preset: Preset = "fast"
    mode: Mode = "detect"
    seed: int = 1
    max_seeds: int = 16
    search_patience: int | None = None  # search: stop after this many rounds add no PV
    features: tuple[str, ...] | None = None  # None: cls, and mask when the tokenizer has one
    # not searched, but every accepted trigger is judged there too, so a tagger's monitor
    # gets PVs of its own (a token-level backdoor also moves CLS, where it is found)
    confirm_features: tuple[str, ...] = ("token",)
    complete: bool = False          # detect mode: once backdoored, search on for every PV
    references: tuple[str, ...] | None = None  # clean bases to diff against; None: installed
    # no reference source at all (declared, siblings, configured, installed): recall
    # without a base is measured apart (docs/method.md)
    no_reference: bool = False
    # the encoder's matmuls: auto = bf16 where the device has it natively (encoders.py);
    # the evidence is measured against noise floors taken at the same precision
    precision: Precision = "auto"
    mining: MiningConfig = field(default_factory=MiningConfig)
    filtering: FilterConfig = field(default_factory=FilterConfig)
    decision: DecisionConfig = field(default_factory=DecisionConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.precision not in PRECISIONS:  # `--set precision=...` is checked up front
            raise ValueError(f"unknown precision {self.precision!r}; choose from "
                             f"{', '.join(PRECISIONS)}")

    @classmethod
    def from_preset(cls, preset: Preset = "fast", **overrides: Any) -> ScanConfig:
        """A preset with top-level or nested overrides (`mining=MiningConfig(...)` or
        flat names such as `steps_per_seed=50`, routed to the stage that owns them)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        config = PRESETS[preset]
        mode = overrides.get("mode", config.mode)
        if "feature" in overrides and "features" not in overrides:
            overrides["features"] = (overrides["feature"],)  # one feature asked for
        if "max_seeds" not in overrides:
            overrides["max_seeds"] = SEED_BUDGETS[preset][mode]
        stages = {"mining": config.mining, "filtering": config.filtering,
                  "decision": config.decision, "search": config.search}
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {name: {} for name in stages}
        for key, value in overrides.items():
            owner = next((name for name, stage in stages.items()
                          if key in {f.name for f in fields(stage)}), None)
            if key in {f.name for f in fields(cls)}:
                top[key] = value
            elif owner:
                nested[owner][key] = value
            else:
                raise TypeError(f"unknown scan option {key!r}")
        for name, stage in stages.items():
            top.setdefault(name, replace(stage, **nested[name]))
        return replace(config, **top)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def config_hash(self) -> str:
        """Stable across runs and machines: sha256 of the canonical JSON, 16 hex digits."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


PRESETS: dict[str, ScanConfig] = {
    # The published schedule and rule: 2000 sentences padded to 128 tokens, batch 32,
    # 4 epochs per seed, one seed at a time, first accepted PV decides.
    "faithful": ScanConfig(
        preset="faithful",
        precision="float32",
        mining=MiningConfig(pad_to_max_length=True),
        decision=DecisionConfig(rule="paper"),
    ),
    # Ours: short dynamic-padded sentences, several seeds per batch, fixed short budget.
    "fast": ScanConfig(
        preset="fast",
        search_patience=2,
        mining=MiningConfig(n_sentences=256, max_length=64, batch_size=16, parallel_seeds=4,
                            steps_per_seed=50, abandon_after=25),
    ),
}
SEED_BUDGETS: dict[str, dict[str, int]] = {
    "faithful": {"detect": 30, "search": 1000},
    # fast detect mode mines no seed: its verdict rests on confirmed hard triggers, and on
    # MiniLM-L6 every soft seed reaches one universal point (docs/method.md); search mode
    # mines seeds to aim context searches at their PVs
    "fast": {"detect": 0, "search": 8},
}
