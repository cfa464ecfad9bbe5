"""The private Prefect API's settings for the run it serves (flows/prefect_backend.py)."""

import importlib.util
import os

from flows.prefect_backend import _use_api


def test_the_run_reports_to_the_private_api_without_heartbeats():
    from prefect.settings import PREFECT_API_URL, get_current_settings

    url = "http://127.0.0.1:9/api"
    before = (os.environ.get("PREFECT_API_URL"), PREFECT_API_URL.value(),
              get_current_settings().flows.heartbeat_frequency)
    with _use_api(url):
        assert os.environ["PREFECT_API_URL"] == url  # for child processes too
        assert PREFECT_API_URL.value() == url
        # nothing outlives the run to read heartbeats; each flow's end waited on them
        assert get_current_settings().flows.heartbeat_frequency is None
    assert (os.environ.get("PREFECT_API_URL"), PREFECT_API_URL.value(),
            get_current_settings().flows.heartbeat_frequency) == before


def test_the_flow_module_and_the_preload_are_imported_while_the_backend_starts(
        tmp_path, monkeypatch):
    import sys

    from flows.prefect_backend import flow_backend
    from sanitator.pipeline.mlflow_schema import CLIENT_MODULES

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # configured: used as is
    for name in ("colorsys", "wave"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with flow_backend(tmp_path / "prefect.log", dask_address="tcp://127.0.0.1:9",
                      n_workers=1, torch_threads=1, device="cpu", flow_module="colorsys",
                      preload=("wave", "no_such_module_here")) as address:
        assert address == "tcp://127.0.0.1:9"  # a given scheduler: no cluster of our own
        assert "colorsys" in sys.modules and "wave" in sys.modules
    for name in CLIENT_MODULES:  # what the audit command preloads is really there
        assert importlib.util.find_spec(name) is not None
