"""Task-agnostic backdoor attacks (POR, NeuBA, BToP, token-level POR) and clean continued
pretraining.

Each recipe takes a base encoder folder, a corpus, a budget and a seed and writes a
standard Hugging Face folder (safetensors, config, tokenizer) plus a JSON record:
`backdoor.json` for the attacks, `training.json` for continued pretraining.
"""

from __future__ import annotations

from collections.abc import Callable

from sanitator.attacks import btop, classifier, mlm, neuba, por, token_por
from sanitator.attacks.btop import insert_btop
from sanitator.attacks.classifier import fine_tune_classifier
from sanitator.attacks.common import AttackResult, Budget
from sanitator.attacks.mlm import continue_pretraining
from sanitator.attacks.neuba import insert_neuba
from sanitator.attacks.por import insert_por
from sanitator.attacks.recipe import BACKDOOR_RECORD, TRAINING_RECORD, run_recipe
from sanitator.attacks.targets import TargetSpec, paper_block_pvs, random_direction_pvs
from sanitator.attacks.token_por import insert_token_por
from sanitator.attacks.triggers import PAPER_TRIGGERS, draw_triggers
from sanitator.detect.encoders import Feature

# attack name -> (function, monitored feature); the token-level POR (`insert_token_por`,
# recipe `tokpor`) reads every token position, a feature outside detect's Feature
ATTACKS: dict[str, tuple[Callable[..., AttackResult], Feature]] = {
    "por": (insert_por, Feature.CLS),
    "neuba": (insert_neuba, Feature.CLS),
    "btop": (insert_btop, Feature.MASK),
}
# recipe name -> its default budget ("mlm" is continued pretraining)
DEFAULT_BUDGETS: dict[str, Budget] = {
    "por": por.DEFAULT_BUDGET, "neuba": neuba.DEFAULT_BUDGET, "btop": btop.DEFAULT_BUDGET,
    "mlm": mlm.DEFAULT_BUDGET, "classifier": classifier.DEFAULT_BUDGET,
    "tokpor": token_por.DEFAULT_BUDGET,
}

__all__ = [
    "ATTACKS", "BACKDOOR_RECORD", "DEFAULT_BUDGETS", "PAPER_TRIGGERS", "TRAINING_RECORD",
    "AttackResult", "Budget", "TargetSpec", "continue_pretraining", "draw_triggers",
    "fine_tune_classifier", "insert_btop", "insert_neuba", "insert_por", "insert_token_por",
    "paper_block_pvs",
    "random_direction_pvs", "run_recipe",
]
