"""The schema of report.json (JSON Schema 2020-12). Fields are only ever added."""

from __future__ import annotations

from typing import Any

from sanitator.report.model import (
             FINDING_STATUSES,
             REPORT_FORMAT,
             REPORT_VERSION,
             SKIPPED_STATUSES,
             STATUSES,
)

_NULLABLE_STR = {"type": ["string", "null"]}
_NULLABLE_NUM = {"type": ["number", "null"]}
_MODEL_ID = {"registry": {"type": "string"}, "source": {"type": "string"},
             "repo_id": {"type": "string"}, "revision": {"type": "string"}}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0},
           "required": list(STATUSES)}
_EVALUATION = {
    "type": "object",
    "required": ["task", "method", "asr", "defended_asr", "clean_accuracy",
                 "defended_clean_accuracy", "monitor_fpr", "evaluated_at", "audit_id"],
    "properties": {"task": {"type": "string"}, "method": {"type": "string"},
                   "asr": _NULLABLE_NUM, "defended_asr": _NULLABLE_NUM,
                   "clean_accuracy": _NULLABLE_NUM, "defended_clean_accuracy": _NULLABLE_NUM,
                   "monitor_fpr": _NULLABLE_NUM, "evaluated_at": {"type": "string"},
                   "audit_id": _NULLABLE_STR},
}
_MODEL_ROW = {
    "type": "object",
    "required": [*_MODEL_ID, "status", "audit_id", "audited_at", "config_hash", "reason",
                 "mlflow_run_id", "mlflow_url", "audits"],
    "properties": {**_MODEL_ID, "status": {"enum": list(STATUSES)},
                   "audit_id": {"type": "string", "pattern": "^[0-9a-f]+$"},
                   "audited_at": {"type": "string"}, "config_hash": {"type": "string"},
                   "reason": _NULLABLE_STR, "mlflow_run_id": _NULLABLE_STR,
                   "mlflow_url": _NULLABLE_STR, "audits": {"type": "integer", "minimum": 1}},
}
_FINDING = {
    "type": "object",
    "required": [*_MODEL_ROW["required"], "score", "pv_count", "trigger_tokens",
                 "architecture", "n_params", "seconds", "evaluations"],
    "properties": {**_MODEL_ROW["properties"], "status": {"enum": list(FINDING_STATUSES)},
                   "score": _NULLABLE_NUM, "pv_count": {"type": "integer", "minimum": 0},
                   "trigger_tokens": {"type": "array", "items": {"type": "string"}},
                   "architecture": _NULLABLE_STR, "n_params": {"type": ["integer", "null"]},
                   "seconds": _NULLABLE_NUM,
                   "evaluations": {"type": "array", "items": _EVALUATION}},
}
_ERROR = {
    "type": "object", "required": [*_MODEL_ROW["required"], "retryable"],
    "properties": {**_MODEL_ROW["properties"], "status": {"const": "error"},
                   "retryable": {"type": "boolean"}},
}
_SKIPPED = {
    "type": "object", "required": _MODEL_ROW["required"],
    "properties": {**_MODEL_ROW["properties"], "status": {"enum": list(SKIPPED_STATUSES)}},
}
_CHANGE = {
    "type": "object", "required": ["registry", "repo_id", "revision", "status",
                                   "previous_status"],
    "properties": {"registry": {"type": "string"}, "repo_id": {"type": "string"},
                   "revision": {"type": "string"}, "status": {"type": "string"},
                   "previous_status": _NULLABLE_STR},
}
REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "sanitator supply-chain report",
    "type": "object",
    "required": ["format", "format_version", "generated_at", "package_version", "store",
                 "summary", "findings", "errors", "skipped", "diff"],
    "properties": {
        "format": {"const": REPORT_FORMAT},
        "format_version": {"const": REPORT_VERSION},
        "generated_at": {"type": "string"},
        "package_version": {"type": "string"},
        "store": {"type": "string"},
        "summary": {
            "type": "object",
            "required": ["models", "audits", "by_status", "by_registry", "first_audit_at",
                         "last_audit_at", "evaluations"],
            "properties": {
                "models": {"type": "integer", "minimum": 0},
                "audits": {"type": "integer", "minimum": 0},
                "by_status": _COUNTS,
                "by_registry": {"type": "object", "additionalProperties": _COUNTS},
                "first_audit_at": _NULLABLE_STR, "last_audit_at": _NULLABLE_STR,
                "evaluations": {"type": "integer", "minimum": 0},
            },
        },
        "findings": {"type": "array", "items": _FINDING},
        "errors": {"type": "array", "items": _ERROR},
        "skipped": {"type": "array", "items": _SKIPPED},
        "diff": {
            "type": "object",
            "required": ["baseline_generated_at", "newly_backdoored", "newly_inconclusive",
                         "newly_clean", "newly_errored"],
            "properties": {"baseline_generated_at": _NULLABLE_STR,
                           "newly_backdoored": {"type": "array", "items": _CHANGE},
                           "newly_inconclusive": {"type": "array", "items": _CHANGE},
                           "newly_clean": {"type": "array", "items": _CHANGE},
                           "newly_errored": {"type": "array", "items": _CHANGE}},
        },
    },
}
