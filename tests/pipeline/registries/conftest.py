import shutil
from pathlib import Path

import pytest
from pipeline_servers import make_pickle_only, shared_mlflow_server

from sanitator.pipeline.registries.hubserver import HubServer


@pytest.fixture(scope="session")
def hub_zoo(tmp_path_factory, tiny_encoders) -> Path:
    """Hub repos: acme/enc-a (bert), acme/dec-b (gpt2), acme/pickled (pickle-only bert)."""
    root = tmp_path_factory.mktemp("hubzoo")
    shutil.copytree(tiny_encoders["bert"], root / "acme" / "enc-a")
    (root / "acme" / "enc-a" / "README.md").write_text("not downloaded by the audit")
    shutil.copytree(tiny_encoders["gpt2"], root / "acme" / "dec-b")
    make_pickle_only(tiny_encoders["bert"], root / "acme" / "pickled")
    shutil.copytree(tiny_encoders["roberta"], root / "other" / "enc-c")
    return root


@pytest.fixture(scope="session")
def hub(hub_zoo):
    with HubServer(hub_zoo) as server:
        yield server


@pytest.fixture
def hub_env(hub, monkeypatch):
    """HF_ENDPOINT pointing at the local hub, offline mode on as in every sanitator run."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, request):
    server, started = shared_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    if started:
        request.addfinalizer(server.stop)
    return server
