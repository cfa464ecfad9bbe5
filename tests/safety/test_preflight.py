"""The preflight against the hostile corpus (tests/hostile_corpus.py) and fuzzed headers
and indexes: every case gets its exact status before any model is built, nothing but
ModelRejected escapes, no payload runs, and `sanitator scan --json` prints one object."""

import json
import pickle
import shutil
import struct
import tempfile
import time
from pathlib import Path

import pytest
from hostile_corpus import CANARY_PREFIX, _Payload, canaries
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sanitator.cli import main
from sanitator.detect.encoders import load_encoder
from sanitator.safety.model_policy import ModelRejected
from sanitator.safety.preflight import preflight
from sanitator.safety.weight_files import read_index, read_safetensors_header


def _outcome(folder: Path) -> tuple[str, str | None]:
    try:
        load_encoder(folder)
    except ModelRejected as exc:
        return exc.status, exc.reason
    return "verdict", None


def test_every_corpus_case_gets_its_exact_status_before_any_model_is_built(hostile_corpus):
    wrong = []
    for case in hostile_corpus["cases"]:
        status, reason = _outcome(hostile_corpus["root"] / case.name)
        if status != case.status or (case.reason and case.reason not in (reason or "")):
            wrong.append(f"{case.name}: got {status} {reason!r}, want {case.status} "
                         f"{case.reason!r}")
    assert wrong == []
    assert canaries(hostile_corpus["base"], Path.cwd()) == []


def test_scan_prints_one_json_object_and_no_traceback_for_every_rejected_case(
        hostile_corpus, capsys):
    rejected = [c for c in hostile_corpus["cases"] if c.status != "verdict"]
    assert len(rejected) >= 40
    for case in rejected:
        code = main(["scan", str(hostile_corpus["root"] / case.name), "--json", "--quiet"])
        out, err = capsys.readouterr()
        payload = json.loads(out)  # exactly one object on stdout
        assert (code, payload["status"]) == (1, case.status), case.name
        assert case.reason in payload["reason"], case.name
        assert set(payload) == {"status", "score", "pvs", "trigger_tokens", "seeds_tried",
                                "seconds", "reason", "evidence"}
        assert "Traceback" not in err, case.name
    assert canaries(hostile_corpus["base"], Path.cwd()) == []


def test_a_size_bomb_is_refused_in_preflight_in_well_under_ten_seconds(hostile_corpus):
    started = time.monotonic()
    with pytest.raises(ModelRejected, match="num_hidden_layers=1,000,000"):
        preflight(hostile_corpus["root"] / "size-bomb-layers")
    assert time.monotonic() - started < 10


def test_allowed_pickle_goes_through_the_safe_loader_only(hostile_corpus, tmp_path):
    canary = tmp_path / f"{CANARY_PREFIX}allowed"
    folder = shutil.copytree(hostile_corpus["root"] / "good", tmp_path / "model")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(canary)))
    with pytest.raises(ModelRejected, match="refused by the safe pickle loader"):
        preflight(folder, allow_pickle=True)
    assert not canary.exists()


def test_a_hugging_face_cache_snapshot_may_link_into_its_blobs(hostile_corpus, tmp_path):
    repo = tmp_path / "models--acme--enc"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in (hostile_corpus["root"] / "good").iterdir():
        blob = repo / "blobs" / file.name
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / file.name)
    assert preflight(snapshot).model_type == "bert"


# --- fuzzing ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10)
entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "I64", "F99"]) | json_values,
    "shape": st.lists(st.integers(-2, 2 ** 40), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-4, 2 ** 62), min_size=2, max_size=2) | json_values})
headers = (st.dictionaries(st.text(max_size=8), entries, max_size=3)
           | st.dictionaries(st.text(max_size=8), json_values, max_size=3) | json_values)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(headers, st.binary(max_size=32), st.integers(0, 2 ** 64 - 1) | st.none())
def test_no_safetensors_header_makes_the_reader_raise_anything_but_a_rejection(
        header, data, length):
    text = json.dumps(header).encode()
    prefix = struct.pack("<Q", len(text) if length is None else length)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "model.safetensors"
        file.write_bytes(prefix + text + data)
        try:
            specs = read_safetensors_header(file)
        except ModelRejected as exc:
            assert exc.status == "error" and exc.reason.startswith("model.safetensors")
            return
    for spec in specs.values():  # what passes is a well-formed tensor table
        assert all(isinstance(d, int) and d >= 0 for d in spec.shape)


@settings(max_examples=120, deadline=None)
@given(json_values | st.fixed_dictionaries({"weight_map": json_values | st.dictionaries(
    st.text(max_size=6), st.text(max_size=12) | st.sampled_from(
        ["model-1.safetensors", "../x.safetensors", "/etc/passwd", "a/b.safetensors"]),
    max_size=3)}))
def test_no_index_makes_the_reader_raise_anything_but_a_rejection(index):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors.index.json"
        path.write_text(json.dumps(index))
        try:
            weight_map = read_index(path, ".safetensors")
        except ModelRejected as exc:
            assert exc.status == "error"
            return
    for shard in weight_map.values():  # what passes names a file in the model folder
        assert "/" not in shard and not shard.startswith(".")
