"""The supply-chain report flow on real Prefect: files written, summary artifact published."""

import json

from report_support import build_store


def test_report_flow_writes_the_report_and_publishes_the_summary(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.supply_chain_report import supply_chain_report

    store = build_store(tmp_path / "store")
    result = supply_chain_report(store, plots=False)
    out = store / "report"
    assert result["out"] == str(out.resolve())
    assert result["summary"]["by_status"]["backdoored"] == 1
    assert json.loads((out / "report.json").read_text())["summary"] == result["summary"]
    assert (out / "report.sarif").is_file() and (out / "report.html").is_file()
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["supply-chain-report"])))
    assert artifacts and "| backdoored | 1 |" in artifacts[-1].data
    assert "`acme/encoder-b`" in artifacts[-1].data
