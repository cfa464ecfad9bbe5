"""The policy shared by the planner and the preflight: JSON parsing, config fields,
weights and size rules. Property-based: no input makes them raise anything but
ModelRejected."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sanitator.safety.model_policy import (
    ModelRejected,
    check_config_bounds,
    check_config_fields,
    config_facts,
    listed_size_rejection,
    listing_config,
    parse_json,
    size_rejection,
    weights_rejection,
)

# any JSON value, nested a few levels
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12)
# configs whose fields of interest take any JSON type
configs = st.fixed_dictionaries({}, optional={
    "model_type": json_values | st.sampled_from(["bert", "gpt2", "roberta"]),
    "architectures": json_values, "hidden_size": json_values | st.integers(),
    "num_hidden_layers": json_values | st.integers(), "vocab_size": json_values,
    "dtype": json_values | st.sampled_from(["float32", "evil"]),
    "quantization_config": json_values})


def test_json_refuses_what_two_parsers_could_read_differently():
    with pytest.raises(ModelRejected, match="duplicate key 'a'"):
        parse_json('{"a": 1, "a": 2}', "x.json")
    with pytest.raises(ModelRejected, match="not valid JSON"):
        parse_json('{"a": NaN}', "x.json")
    with pytest.raises(ModelRejected, match="not valid JSON"):
        parse_json(b"\xff{}", "x.json")
    with pytest.raises(ModelRejected, match="nested too deeply"):
        parse_json("[" * 100_000 + "]" * 100_000, "x.json")
    assert parse_json('{"a": [1, {"b": null}]}', "x.json") == {"a": [1, {"b": None}]}


def test_config_fields_are_type_checked_with_plain_reasons():
    assert config_facts({"model_type": "bert", "architectures": ["BertModel"]}).model_type \
        == "bert"
    for config, reason in [([], "config.json is a list, not a JSON object"),
                           ({"model_type": ["bert"]}, "model_type is a list"),
                           ({"model_type": 7}, "model_type is an integer"),
                           ({"architectures": 5}, "architectures must be a list of strings"),
                           ({"architectures": ["A", 1]}, "architectures must be a list")]:
        with pytest.raises(ModelRejected, match=reason) as error:
            config_facts(config)
        assert error.value.status == "error"
    with pytest.raises(ModelRejected, match="hidden_size is a string"):
        check_config_fields({"hidden_size": "32"})
    with pytest.raises(ModelRejected, match="num_hidden_layers is a boolean"):
        check_config_fields({"num_hidden_layers": True})
    with pytest.raises(ModelRejected, match="quantized") as error:
        check_config_fields({"quantization_config": {"quant_method": "gptq"}})
    assert error.value.status == "unsupported"
    with pytest.raises(ModelRejected, match=r"num_hidden_layers=1,000,000 is outside"):
        check_config_bounds({"num_hidden_layers": 1_000_000})


def test_listing_config_keeps_good_fields_and_flags_bad_ones():
    assert listing_config({"model_type": "bert", "architectures": ["BertModel"], "x": 1}) == {
        "model_type": "bert", "architectures": ["BertModel"]}
    assert "model_type is a list" in listing_config({"model_type": ["bert"]})["invalid"]
    assert listing_config(None) is None
    assert "not a JSON object" in listing_config([1])["invalid"]


def test_weights_and_size_rules():
    assert weights_rejection(["config.json", "model.safetensors"], False) is None
    assert weights_rejection(["model.safetensors.index.json"], False) is None
    status, reason = weights_rejection(["config.json", "pytorch_model.bin"], False)
    assert status == "error" and "only pickle weights" in reason
    assert weights_rejection(["pytorch_model.bin"], True) is None
    assert "no weights" in weights_rejection(["model-00001-of-00002.safetensors"], True)[1]
    assert size_rejection(1_001, 1_000)[0] == "skipped"
    assert size_rejection(1_000, 1_000) is None and size_rejection(5, None) is None
    assert listed_size_rejection(4_004, 1_000)[0] == "skipped"
    assert listed_size_rejection(4_000, 1_000) is None


@settings(max_examples=150, deadline=None)
@given(configs)
def test_no_config_makes_the_checks_raise_anything_but_a_rejection(config):
    try:
        facts = config_facts(config)
        check_config_fields(config)
        check_config_bounds(config)
    except ModelRejected as exc:
        assert exc.status in {"error", "unsupported"} and exc.reason
        return
    assert facts.model_type is None or isinstance(facts.model_type, str)
    listed = listing_config(config)
    assert set(listed) == {"model_type", "architectures"}


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_no_bytes_make_the_json_parser_raise_anything_but_a_rejection(data):
    try:
        parse_json(data, "config.json")
    except ModelRejected as exc:
        assert exc.status == "error" and "config.json" in exc.reason
