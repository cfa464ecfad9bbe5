"""flows/dask_jobs.py: what each task run of the fan-out carries to its worker."""

import cloudpickle


def test_the_subflow_is_shipped_by_reference_without_the_batch(monkeypatch):
    """Every task run's context holds the subflow; pickled by value, its function took its
    globals along, the requests of the whole batch among them (5 GB in the flow process
    and 2 GB per worker at 1,000 models)."""
    from flows import dask_jobs

    monkeypatch.setitem(dask_jobs._BATCHES, "key", ["a request" * 100_000])
    flow = dask_jobs.run_on_dask.with_options(name="audit-models-on-dask")
    assert len(cloudpickle.dumps(flow)) < 20_000
    assert cloudpickle.loads(cloudpickle.dumps(flow)).fn is dask_jobs._run_on_dask
