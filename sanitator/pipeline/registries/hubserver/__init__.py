"""A small Hugging Face Hub-compatible HTTP server over a folder of model repos.

It answers the read-only endpoints that `huggingface_hub` (list_models, model_info,
list_repo_tree, list_repo_refs, hf_hub_download, snapshot_download) and transformers use,
so the real clients run against an air-gapped mirror or a test fixture with
`HF_ENDPOINT=http://127.0.0.1:PORT`. Layout: `ROOT/ORG/NAME/<files>` (or `ROOT/NAME/<files>`
for repos without an org). Each repo has one revision, `main`, whose commit sha is a digest
of the repo's file contents, so changing a file changes the sha.

    sanitator hub serve ROOT [--host 127.0.0.1] [--port 8765] [--token SECRET]

Stdlib only (`http.server`, threaded). Read-only; no uploads, no git protocol.
"""

from sanitator.pipeline.registries.hubserver.repos import Repo, RepoFile, RepoIndex
from sanitator.pipeline.registries.hubserver.server import (
    HubHTTPServer,
    HubRequestHandler,
    HubServer,
    serve,
)

__all__ = ["HubHTTPServer", "HubRequestHandler", "HubServer", "Repo", "RepoFile", "RepoIndex",
           "serve"]
