"""Model cards and configs: the bases a model declares and the shapes that make siblings."""

import pytest

from sanitator.pipeline.registries.cards import (
    MAX_FRONT_MATTER_BYTES,
    Declared,
    card_bases,
    card_front_matter,
    declared_bases,
    front_matter,
    is_repo_id,
    same_shapes,
    shape_facts,
)


def test_base_model_is_read_from_standard_front_matter_as_a_string_or_a_list():
    card = "---\nlicense: mit\nbase_model: acme/base\ntags: [x]\n---\n# Title\n\nbase_model: no\n"
    assert card_bases(front_matter(card)) == ["acme/base"]
    listed = "\ufeff---\r\nbase_model:\r\n- acme/a\r\n- b-model\r\n- /tmp/local\r\n---\r\n"
    assert card_bases(front_matter(listed)) == ["acme/a", "b-model"]  # a path is no id
    assert card_bases(front_matter("# no front matter\nbase_model: acme/x\n")) == []
    assert card_bases(front_matter("---\nbase_model: {a: 1}\n---\n")) == []


@pytest.mark.parametrize("text", [
    "---\nbase_model: [unclosed\n---\n",      # not YAML
    "---\n- a\n- b\n---\n",                     # not a mapping
    "---\nbase_model: acme/x\n",                # never closed
    "---\n" + "x: " + "y" * MAX_FRONT_MATTER_BYTES + "\n---\n",
    "---\n" + "[" * 5000 + "\n---\n",           # nesting
    "---\na: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\nbase_model: *b\n---\n",  # aliases
])
def test_a_bad_front_matter_is_a_value_error(text):
    with pytest.raises(ValueError):
        front_matter(text)


def test_card_bytes_that_are_not_utf8_still_parse():
    assert card_bases(card_front_matter(b"---\nbase_model: acme/b\nx: \xff\n---\n")) == [
        "acme/b"]


def test_repo_ids_are_told_from_local_paths():
    good = ["acme/base", "bert-base-uncased", "org/name@v2", "org/name@0123abcd", "a.b/c_d"]
    bad = ["/abs/path", "./model", "~/model", "a/b/c", "..", "org/..", "C:\\x", "a--b/c",
           "", "org/name/", "x" * 200, None, 3]
    assert all(is_repo_id(v) for v in good)
    assert not any(is_repo_id(v) for v in bad)


def test_declared_bases_put_the_card_first_and_read_name_or_path_only_as_an_id():
    assert declared_bases(["acme/a"], {"_name_or_path": "nreimers/MiniLM-L6-H384-uncased"}) \
        == [Declared("acme/a", "card"), Declared("nreimers/MiniLM-L6-H384-uncased", "config")]
    assert declared_bases([], {"_name_or_path": "/tmp/run/model"}) == []
    assert declared_bases(["acme/a"], {"_name_or_path": "acme/a"}) == [Declared("acme/a",
                                                                                  "card")]


def test_siblings_share_every_shape_a_base_may_have_more_layers():
    bert = {"model_type": "bert", "hidden_size": 384, "num_hidden_layers": 6,
            "num_attention_heads": 12, "intermediate_size": 1536, "vocab_size": 30522,
            "architectures": ["BertModel"], "hidden_act": "gelu"}
    facts = shape_facts(bert)
    assert facts == {k: v for k, v in bert.items() if k not in {"architectures", "hidden_act"}}
    assert same_shapes(facts, shape_facts(dict(bert)))
    wider = shape_facts({**bert, "vocab_size": 30000})
    shallow = shape_facts({**bert, "num_hidden_layers": 2})
    assert not same_shapes(facts, wider)
    assert not same_shapes(shallow, facts)
    assert same_shapes(shallow, facts, fewer_layers=True)   # a truncation of the base
    assert not same_shapes(facts, shallow, fewer_layers=True)
    # an optional field only counts when both name it
    assert same_shapes(facts, shape_facts({**bert, "position_embedding_type": "absolute"}))
    assert shape_facts({"model_type": "bert"}) is None
    assert shape_facts({**bert, "hidden_size": True}) is None
    assert not same_shapes(None, facts)
