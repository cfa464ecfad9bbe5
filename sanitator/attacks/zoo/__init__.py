"""Labelled model zoos: clean and backdoored encoders built from a YAML spec.

A spec (`spec`) names bases (`bases`), trigger sets, targets and budgets, and lists members;
`build_zoo` (`build`) writes every member to `OUT/models/<name>/` and the ground truth to
`OUT/manifest.parquet` (`manifest`). docs/attacks.md describes the format.
"""

from sanitator.attacks.zoo.bases import assemble_mpnet, copy_clean, materialize_base
from sanitator.attacks.zoo.build import BuildReport, build_zoo
from sanitator.attacks.zoo.manifest import MANIFEST_COLUMNS, read_manifest, write_manifest
from sanitator.attacks.zoo.spec import (
    MANIFEST,
    MEMBER_RECORD,
    MODELS_DIR,
    RECIPES,
    BaseUnavailable,
    MemberSpec,
    SpecError,
    ZooSpec,
    load_spec,
    parse_spec,
)

__all__ = [
    "MANIFEST", "MANIFEST_COLUMNS", "MEMBER_RECORD", "MODELS_DIR", "RECIPES", "BaseUnavailable",
    "BuildReport", "MemberSpec", "SpecError", "ZooSpec", "assemble_mpnet", "build_zoo",
    "copy_clean", "load_spec", "materialize_base", "parse_spec", "read_manifest",
    "write_manifest",
]
