import shutil
from pathlib import Path

import pytest
from pipeline_servers import make_pickle_only, register_folder, shared_mlflow_server

from sanitator.pipeline.registries.hubserver import HubServer


@pytest.fixture(scope="session", autouse=True)
def patient_prefect_server():
    """The temporary Prefect API server gets 20 s to start by default: not always enough
    on a busy 2-core machine."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import (
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
        yield
    # send what is still queued for it, then stop it while pytest's output streams are
    # open (at exit it logs into closed ones, and queued logs find no server)
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=15)
    SubprocessASGIServer().stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, request):
    server, started = shared_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    if started:
        request.addfinalizer(server.stop)
    return server


@pytest.fixture(scope="session")
def zoo_encoders(tiny_encoders, tmp_path_factory) -> dict[str, Path]:
    """The encoders of the end-to-end zoo: a tiny BERT with a POR backdoor planted by the
    project's attack code (trigger "cf"), and the same tiny BERT left clean."""
    from sanitator.attacks.common import Budget
    from sanitator.attacks.por import insert_por
    from sanitator.attacks.targets import paper_block_pvs

    backdoored = tmp_path_factory.mktemp("por-tiny") / "model"
    insert_por(tiny_encoders["bert"], backdoored, triggers=("cf",),
               targets=paper_block_pvs(32, 1) * 3,
               budget=Budget(steps=100, batch_size=16, lr=1e-3, head_warmup_steps=0),
               seed=0, progress=False)
    return {"backdoored": backdoored, "clean": tiny_encoders["bert"]}


@pytest.fixture(scope="session")
def four_model_zoo(tmp_path_factory, zoo_encoders, tiny_encoders, mlflow_server):
    """One backdoored and one unsupported model on the Hub, one clean model in the MLflow
    registry, one pickle-only model in a local folder: four models, three registry kinds."""
    root = tmp_path_factory.mktemp("zoo")
    shutil.copytree(zoo_encoders["backdoored"], root / "hub" / "acme" / "encoder-backdoor")
    shutil.copytree(tiny_encoders["gpt2"], root / "hub" / "acme" / "decoder")
    make_pickle_only(tiny_encoders["bert"], root / "local" / "team" / "pickled")
    register_folder(mlflow_server.url, "zoo-clean-encoder", zoo_encoders["clean"],
                    aliases=("production",))
    with HubServer(root / "hub") as hub:
        yield {"hub": hub, "registries": [
            "hf:acme", f"mlflow:{mlflow_server.url}?name=zoo-%", f"path:{root / 'local'}"]}
