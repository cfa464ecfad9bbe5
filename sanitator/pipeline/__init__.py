"""Orchestration-free audit pipeline: registries (crawl, fetch, the Hub mirror server), the
job contract both flows share (plan -> run -> rows -> track) and its one fan-out with the
hang backstop, the audit plan and per-model run, the Parquet store, MLflow tracking,
pulling PV artifacts. Prefect and Dask live in flows/ and tasks/, never here.
"""

from sanitator.core.lazy import lazy_exports

_EXPORTS = {
    "AuditJob": "audit_job",
    "AuditOutcome": "audit",
    "AuditPolicy": "audit",
    "AuditRequest": "audit",
    "AuditTracker": "audit_tracking",
    "FetchError": "registries",
    "Job": "jobs",
    "JobPlan": "jobs",
    "ModelRef": "registries",
    "RegistryError": "registries",
    "StoreError": "store",
    "TransientJobError": "jobs",
    "fan_out": "fanout",
    "fetch_ref": "registries",
    "latest_verdicts": "store",
    "open_tracker": "audit_tracking",
    "parse_registry": "registries",
    "plan_audits": "audit",
    "pull_pv_artifact": "pv_pull",
    "read_pvs": "store",
    "read_verdicts": "store",
    "record": "jobs",
    "run_audit": "audit",
    "summarize": "audit",
    "write_rows": "store",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
