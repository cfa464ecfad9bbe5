"""Reference planning (pipeline/references.py through AuditJob.plan and ready): declared
bases first and vouching only when clean, sibling preselection, falling through with a
reason. No I/O: the refs are what a described crawl yields."""

import hashlib

from sanitator.detect.config import ScanConfig
from sanitator.pipeline.audit_job import AuditJob
from sanitator.pipeline.references import MIN_SIBLINGS, SIBLINGS_FETCHED
from sanitator.pipeline.registries import ModelRef

BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 1000}
CONFIG = ScanConfig.from_preset("fast")


def _ref(name, *declared, shape=BERT, size=40_000, extra=None, **kwargs):
    revision = hashlib.sha1(name.encode()).hexdigest()
    return ModelRef("hf", "hf:acme", name, revision, "http://hub",
                    files=(("config.json", 500), ("model.safetensors", size),
                           ("tokenizer.json", 100)),
                    extra={"declared": [{"id": d, "from": "card"} for d in declared],
                           "shape": shape, **(extra or {})}, **kwargs)


def _history(ref, status, config_hash=None):
    return {"source": ref.source, "repo_id": ref.repo_id, "revision": ref.revision,
            "config_hash": config_hash or CONFIG.config_hash(), "status": status,
            "allow_pickle": False, "max_params": None, "retryable": False}


def _plan(refs, history=(), **job):
    job = AuditJob(CONFIG.to_dict(), CONFIG.config_hash(), **job)
    plan = job.plan(refs, list(history))
    return job, plan, {r.ref.repo_id: r for r in plan.todo}


def _sources(request):
    return [(c.source, [r.repo_id for r in c.refs]) for c in request.references]


def test_a_declared_base_is_audited_first_and_vouches_only_once_clean():
    refs = [_ref("acme/s1"), _ref("acme/ft", "acme/base"), _ref("acme/s2"), _ref("acme/base"),
            _ref("acme/s3")]
    job, plan, todo = _plan(refs)
    base, ft = todo["acme/base"], todo["acme/ft"]
    assert plan.todo[0] is base                    # bases first in the one fan-out
    assert job.waits_for(ft) == (base.audit_id,) and job.waits_for(base) == ()
    assert _sources(ft)[0] == ("declared", ["acme/base"])
    assert ft.references[0].waits_for == base.audit_id
    assert ft.reference_log["declared"][0]["status"] == "audited first in this flow"
    # planned as the fallback while the base is audited, never fetched when it is clean
    assert ("siblings", ["acme/base", "acme/s1", "acme/s2", "acme/s3"]) in _sources(ft)

    clean = job.ready(ft, {base.audit_id: {"status": "clean", "source": "hf",
                                           "repo_id": "acme/base",
                                           "revision": base.ref.revision}})
    assert _sources(clean) == [("declared", ["acme/base"])] and clean.waits_for == ()
    assert clean.references[0].waits_for is None
    assert clean.reference_log["declared"][0]["status"] == "audited clean in this flow"
    assert "vouches" in clean.reference_log["siblings"]["not_fetched"]

    # a backdoor shared by base and derivative must not cancel out: the base is dropped,
    # from the declared tier and from the siblings' median
    backdoored = job.ready(ft, {base.audit_id: {
        "status": "backdoored", "reason": None, "source": "hf", "repo_id": "acme/base",
        "revision": base.ref.revision}})
    assert _sources(backdoored) == [("siblings", ["acme/s1", "acme/s2", "acme/s3"])]
    entry = backdoored.reference_log["declared"][0]
    assert entry["skipped"] == "the base was audited backdoored in this flow"
    assert backdoored.reference_log["siblings"]["dropped"] == [
        f"acme/base@{base.ref.revision[:12]}"]
    lost = job.ready(ft, {base.audit_id: None})
    assert lost.reference_log["declared"][0]["skipped"] == "the base's audit left no row"


def test_an_earlier_verdict_settles_the_base_without_waiting():
    base, ft = _ref("acme/base"), _ref("acme/ft", "acme/base")
    siblings = [_ref(f"acme/s{i}") for i in range(4)]
    _, _, todo = _plan([base, ft, *siblings], [_history(base, "clean")])
    assert "acme/base" not in todo                     # settled: not audited again
    request = todo["acme/ft"]
    assert request.waits_for == () and _sources(request) == [("declared", ["acme/base"])]
    assert request.reference_log["declared"][0]["status"] == "audited clean earlier"
    assert request.reference_log["siblings"] == {"skipped": "a declared base vouches"}

    # audited backdoored: not the declared base, not a sibling
    _, _, todo = _plan([base, ft, *siblings], [_history(base, "backdoored")])
    request = todo["acme/ft"]
    assert request.waits_for == ()
    assert request.reference_log["declared"][0]["skipped"] == "the base was audited backdoored"
    assert _sources(request) == [("siblings", [f"acme/s{i}" for i in range(4)])]
    # under another config it is audited again, and waited for; no sibling meanwhile
    _, _, todo = _plan([base, ft, *siblings], [_history(base, "backdoored", "0" * 16)])
    assert todo["acme/ft"].waits_for == (todo["acme/base"].audit_id,)
    assert [s for s, refs in _sources(todo["acme/ft"]) if "acme/base" in refs] == [
        "declared"]


def test_sibling_preselection_caps_the_fetches_and_never_takes_the_model_itself():
    family = [_ref(f"acme/m{i}") for i in range(8)]
    others = [_ref("acme/z-ft", "acme/m5"),                     # m5 is fetched for it anyway
              _ref("acme/wide", shape={**BERT, "hidden_size": 64}),
              _ref("acme/half", size=20_000),                    # another dtype
              _ref("acme/broken", crawl_error="cannot read")]
    history = [_history(family[6], "clean"), _history(family[7], "backdoored")]
    _, _, todo = _plan([*family, *others], history)
    fetched = set()
    for name in (f"acme/m{i}" for i in range(7)):
        request = todo.get(name)
        if request is None:
            continue                                   # m6 is settled clean
        sources = dict((s, refs) for s, refs in _sources(request))
        median = sources["siblings"]
        assert name not in median and len(median) == SIBLINGS_FETCHED >= MIN_SIBLINGS
        assert not {"acme/wide", "acme/half", "acme/broken", "acme/m7"} & set(median)
        # clean-audited first, then somebody's declared base, then by size and id
        assert median[:2] == ["acme/m6", "acme/m5"] or name == "acme/m5"
        assert sources["sibling"] == ["acme/m6"]       # and tried alone first
        assert request.reference_log["siblings"]["compatible"] == 7
        fetched |= set(median)
    # one ranking for the whole family: at most SIBLINGS_FETCHED + 1 distinct siblings
    assert len(fetched) <= SIBLINGS_FETCHED + 1


def test_a_base_that_cannot_be_used_falls_through_with_its_reason():
    refs = [_ref("acme/decoder", config={"model_type": "gpt2", "architectures": ["GPT2Model"]}),
            _ref("acme/ft", extra={"declared": [
                {"id": "acme/gone", "from": "card",
                 "missing": "acme/gone not found on http://hub"},
                {"id": "acme/ft", "from": "config"}, {"id": "acme/roberta", "from": "card"},
                {"id": "acme/refused", "from": "card"}, {"id": "acme/decoder", "from": "card"},
                {"id": "acme/deep", "from": "card"}]}),
            _ref("acme/roberta", shape={**BERT, "model_type": "roberta"}),
            _ref("acme/refused", crawl_error="cannot read the repo's details"),
            _ref("acme/deep", shape={**BERT, "num_hidden_layers": 6})]   # a truncation's base
    _, _, todo = _plan(refs)
    entries = {e["id"]: e for e in todo["acme/ft"].reference_log["declared"]}
    assert entries["acme/gone"]["skipped"] == "acme/gone not found on http://hub"
    assert entries["acme/ft"]["skipped"] == "names the audited model itself"
    assert "shapes" in entries["acme/roberta"]["skipped"]
    assert entries["acme/refused"]["skipped"].startswith("the base was not audited: cannot")
    assert entries["acme/decoder"]["skipped"].startswith("the base was not audited: ")
    assert "gpt2" in entries["acme/decoder"]["skipped"]  # the plan's unsupported row
    assert entries["acme/deep"]["status"] == "audited first in this flow"
    assert todo["acme/ft"].waits_for == (todo["acme/deep"].audit_id,)


def test_bases_that_declare_each_other_do_not_wait_for_each_other():
    refs = [_ref("acme/a", "acme/b"), _ref("acme/b", "acme/a")]
    _, _, todo = _plan(refs)
    waits = [todo["acme/a"].waits_for, todo["acme/b"].waits_for]
    assert sorted(len(w) for w in waits) == [0, 1]
    cycle = [e for r in todo.values() for e in r.reference_log["declared"]
             if e.get("skipped")]
    assert [e["skipped"] for e in cycle] == ["the bases declare each other (a cycle)"]


def test_no_reference_plans_nothing_and_a_catalog_base_is_configured_for_every_model():
    base, ft = _ref("acme/base"), _ref("acme/ft", "acme/base")
    config = ScanConfig.from_preset("fast", no_reference=True)
    job = AuditJob(config.to_dict(), config.config_hash())
    for request in job.plan([base, ft], []).todo:
        assert request.references == () and request.reference_log is None
        assert request.waits_for == ()
    catalog = _ref("hub/clean-bert")
    _, _, todo = _plan([ft], catalog=(catalog,), catalog_problems={"hf:x/y": "not found"})
    assert ("configured", ["hub/clean-bert"]) in _sources(todo["acme/ft"])
    assert todo["acme/ft"].reference_log["configured"] == [
        {"id": "hub/clean-bert", "revision": catalog.revision},
        {"id": "hf:x/y", "skipped": "not found"}]
