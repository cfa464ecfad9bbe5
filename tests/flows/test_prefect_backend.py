"""The private Prefect API's settings for the run it serves (flows/prefect_backend.py)."""

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
