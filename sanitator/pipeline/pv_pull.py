"""Pull a PV artifact from an audit store: find the model's audit (latest, or at a given
revision), take its PVs from the Parquet `pvs/` dataset or, failing that, from the audit's
MLflow run (`pvset.safetensors`), and return a `PVArtifact` (sanitator.guard.pv_artifact)."""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from pathlib import Path
from typing import Any, Literal

from sanitator import __version__
from sanitator.core import MONITOR_THRESHOLD, SCANNED_STATUSES, VERDICT_STATUSES, Status
from sanitator.detect.results import PVSet
from sanitator.guard.pv_artifact import (
    ARTIFACT_FORMAT,
    ARTIFACT_VERSION,
    CLEAN_NOTE,
    PVArtifact,
    PVArtifactError,
    revision_matches,
)
from sanitator.pipeline.audit_tracking import MLFLOW_ARTIFACT, default_tracking_uri
from sanitator.pipeline.store import VERDICTS, StoreError, pvset_from_rows, read_pvs, read_verdicts

PVSource = Literal["auto", "store", "mlflow"]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:
        return ""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _completion_of(row: dict[str, Any]) -> str:
    """How the audit completed the PV set (mode, rounds, stop reason) as JSON, or ""."""
    text = row.get("evidence")
    try:
        evidence = json.loads(text) if isinstance(text, str) and text else {}
    except ValueError:
        return ""
    completion = evidence.get("completion") if isinstance(evidence, dict) else None
    return json.dumps(completion, sort_keys=True) if completion else ""


def _feature_of(row: dict[str, Any]) -> str:
    try:
        config = json.loads(row.get("config") or "{}")
    except ValueError:
        config = {}
    return str((config.get("mining") or {}).get("feature") or "cls")


def _choose_row(verdicts, model: str, revision: str | None, registry: str | None,
                force: bool, store: Path) -> tuple[dict[str, Any], bool]:
    """The verdict row to take PVs from, and whether a revision mismatch was forced."""
    rows = verdicts[verdicts["repo_id"] == model]
    if registry is not None:
        rows = rows[rows["registry"] == registry]
    if rows.empty:
        known = sorted(set(verdicts["repo_id"]))
        hint = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "")
        where = f" in registry {registry}" if registry else ""
        raise PVArtifactError(f"no audit of {model!r}{where} in {store}"
                              + (f" (audited models: {hint})" if known else ""))
    registries = sorted(set(rows["registry"]))
    if len(registries) > 1:
        raise PVArtifactError(f"{model!r} was audited in several registries "
                              f"({', '.join(registries)}); pass --registry")
    records = rows.to_dict("records")  # oldest first
    latest = records[-1]
    if revision is None:
        if latest["status"] == Status.INCONCLUSIVE:
            raise PVArtifactError(_inconclusive(model, latest))
        if latest["status"] not in VERDICT_STATUSES:
            raise PVArtifactError(
                f"the latest audit of {model} (revision {latest['revision'][:12]}) has no "
                f"verdict: {latest['status']}"
                + (f" ({latest['reason']})" if latest.get("reason") else "")
                + "; pass --revision to take an earlier audited revision")
        return latest, False
    at_revision = [r for r in records if revision_matches(r["revision"], revision)]
    # the newest scan of the revision decides: a later inconclusive one is not overruled
    scanned = [r for r in at_revision if r["status"] in SCANNED_STATUSES]
    if scanned and scanned[-1]["status"] == Status.INCONCLUSIVE:
        raise PVArtifactError(_inconclusive(model, scanned[-1]))
    if scanned:
        return scanned[-1], False
    if at_revision:
        last = at_revision[-1]
        raise PVArtifactError(f"{model} @ {revision} was audited but has no verdict: "
                              f"{last['status']}"
                              + (f" ({last['reason']})" if last.get("reason") else ""))
    audited = sorted({r["revision"][:12] for r in records})
    if not force:
        raise PVArtifactError(
            f"revision mismatch: {model} was never audited at {revision}; the store holds "
            f"audits of revision(s) {', '.join(audited)} (latest {latest['revision']}). "
            "Audit the deployed revision, or pass --force to take the latest audit's PVs")
    if latest["status"] == Status.INCONCLUSIVE:
        raise PVArtifactError(_inconclusive(model, latest))
    if latest["status"] not in VERDICT_STATUSES:
        raise PVArtifactError(f"the latest audit of {model} has no verdict: {latest['status']}")
    return latest, True


def _inconclusive(model: str, row: dict[str, Any]) -> str:
    """An inconclusive audit has no PV set, and an empty artifact would read as clean."""
    return (f"the audit of {model} (revision {row['revision'][:12]}, audit "
            f"{row['audit_id']}) is inconclusive: the scan left candidates unjudged and "
            "accepted none, so the model is not shown clean and has no PV set to deploy"
            + (f" ({row['reason']})" if row.get("reason") else "")
            + ". Review the model or audit it again (a larger confirmation budget: "
            "`--set confirmation_budget=N`); no artifact was written")


def _pvset_from_mlflow(row: dict[str, Any], store: Path, mlflow_uri: str | None) -> PVSet:
    run_id = row.get("mlflow_run_id")
    if not run_id:
        raise PVArtifactError(f"audit {row['audit_id']} has no MLflow run to fetch PVs from")
    if mlflow_uri is None:
        if not (store / "mlflow.db").is_file():
            raise PVArtifactError(f"audit {row['audit_id']}: no PV rows in the store and no "
                                  f"{store / 'mlflow.db'}; pass --mlflow-uri")
        mlflow_uri = default_tracking_uri(store)
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix="sanitator-pv-") as tmp:
        try:
            local = MlflowClient(tracking_uri=mlflow_uri).download_artifacts(
                run_id, MLFLOW_ARTIFACT, tmp)
        except Exception as exc:  # MLflow raises many kinds for a missing run or artifact
            raise PVArtifactError(f"cannot fetch {MLFLOW_ARTIFACT} of MLflow run {run_id} "
                                  f"from {mlflow_uri}: {type(exc).__name__}: {exc}") from exc
        from safetensors import safe_open

        with safe_open(local, framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("audit_id") and meta["audit_id"] != row["audit_id"]:
            raise PVArtifactError(f"MLflow run {run_id} holds the PVs of audit "
                                  f"{meta['audit_id']}, not {row['audit_id']}")
        return PVSet.load(local)


def pull_pv_artifact(store: str | Path, model: str, *, revision: str | None = None,
                     registry: str | None = None, force: bool = False,
                     threshold: float = MONITOR_THRESHOLD, source: PVSource = "auto",
                     mlflow_uri: str | None = None) -> PVArtifact:
    """The PV artifact of `model` (the repo id the audit recorded) from a store.

    Without `revision` the model's latest audit is used; with one, the newest audit of that
    revision (a commit sha may be abbreviated). A revision the store never audited is refused
    unless `force`, which takes the latest audit and records the requested revision. PVs come
    from the store's `pvs/` dataset (`source="store"`), the audit's MLflow run
    (`"mlflow"`), or the store and then MLflow (`"auto"`).
    """
    store = Path(store)
    if not 0.5 <= threshold < 1.0:
        raise PVArtifactError("threshold must be in [0.5, 1)")
    if not (store / VERDICTS).is_dir():
        raise PVArtifactError(f"{store} has no {VERDICTS}/ dataset: is it the folder that "
                              "`sanitator audit --out` wrote?")
    try:
        verdicts = read_verdicts(store)
    except StoreError as exc:
        raise PVArtifactError(str(exc)) from exc
    row, forced = _choose_row(verdicts, model, revision, registry, force, store)
    feature = _feature_of(row)
    pv_source = "none"
    if row["status"] == Status.CLEAN:
        pvset = PVSet.empty(0, feature=feature)
    else:
        pvset = None
        if source in ("auto", "store"):
            rows = read_pvs(store, audit_id=row["audit_id"])
            if not rows.empty:
                pvset, pv_source = pvset_from_rows(rows), "store"
        if pvset is None and source in ("auto", "mlflow"):
            pvset, pv_source = _pvset_from_mlflow(row, store, mlflow_uri), "mlflow"
        if pvset is None:
            raise PVArtifactError(f"audit {row['audit_id']} of {model}: no PV rows in the store")
        if len(pvset) == 0:
            raise PVArtifactError(f"audit {row['audit_id']} of {model} is backdoored but "
                                  "its PV set is empty")
        feature = pvset.feature or feature
    hidden = int(pvset.vectors.shape[1]) if len(pvset) else 0
    metadata = {
        "format": ARTIFACT_FORMAT, "format_version": str(ARTIFACT_VERSION),
        "model": model, "registry": row["registry"], "source": row["source"],
        "revision": row["revision"], "requested_revision": revision or "",
        "forced": "true" if forced else "false", "status": row["status"],
        "score": _text(row.get("score")), "pv_count": str(len(pvset)),
        "hidden_size": str(hidden), "feature": feature, "threshold": repr(float(threshold)),
        "config_hash": row["config_hash"], "audit_id": row["audit_id"],
        "audited_at": _text(row["audited_at"]), "mlflow_run_id": _text(row.get("mlflow_run_id")),
        "pv_source": pv_source, "package_version": __version__,
        "completion": _completion_of(row),
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "note": CLEAN_NOTE if row["status"] == Status.CLEAN else
        f"backdoored: {len(pvset)} PV(s); flag outputs whose sign pattern agrees with a PV "
        f"on more than {threshold:g} of the {hidden} units",
    }
    return PVArtifact(pvset, metadata)
