"""Loopback servers and model-zoo helpers shared by the pipeline tests.

The real `mlflow server` costs tens of seconds to start on a busy 2-core machine, so one
instance serves the whole session (`shared_mlflow_server`), stopped at session end by
whichever fixture asked for it first.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

MLFLOW_START_TIMEOUT = 120.0
# A scan budget under which the real scan_model separates a tiny BERT with a planted POR
# backdoor from the clean one in a few seconds (tests/flows/conftest.py builds the pair);
# the method's accuracy on real encoders is tested in tests/detect/test_scan.py.
TINY_SCAN = {"steps_per_seed": 40, "n_sentences": 96, "n_holdout": 32, "max_seeds": 4,
             "parallel_seeds": 4, "hard_token_candidates": 16}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen
    root: Path

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)


_SERVER: MlflowServer | None = None


def start_mlflow_server(root: Path) -> MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite backend and proxied artifacts."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = (root / "server.log").open("wb")
    process = subprocess.Popen(
        [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=root)
    server = MlflowServer(f"http://127.0.0.1:{port}", process, root)
    deadline = time.monotonic() + MLFLOW_START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"mlflow server not ready in {MLFLOW_START_TIMEOUT} s")


def shared_mlflow_server(root: Path) -> tuple[MlflowServer, bool]:
    """The session's server, started on first use; the flag says whether this call started it."""
    global _SERVER
    if _SERVER is not None and _SERVER.process.poll() is None:
        return _SERVER, False
    _SERVER = start_mlflow_server(root)
    return _SERVER, True


def register_folder(tracking_uri: str, name: str, folder: Path,
                    aliases: tuple[str, ...] = ()) -> str:
    """Log a model folder as run artifacts and register it as a new version of `name`."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment = client.get_experiment_by_name("model-zoo")
    experiment_id = (experiment.experiment_id if experiment
                     else client.create_experiment("model-zoo"))
    run = client.create_run(experiment_id, run_name=f"train-{name}")
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model",
                                          run_id=run.info.run_id)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def make_pickle_only(source: Path, target: Path) -> Path:
    """A copy of a model folder whose weights exist only as pytorch_model.bin (pickle)."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(source, target)
    state = load_file(str(target / "model.safetensors"))
    (target / "model.safetensors").unlink()
    torch.save(state, target / "pytorch_model.bin")
    return target
