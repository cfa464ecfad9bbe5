"""`benchmarks/null.py`: the exact binomial bounds and the summary it reports (the scans
themselves are the benchmark's, hours of CPU; its proof run is in docs/method.md)."""


import pytest
from scripts_support import load_script


def test_clopper_pearson_bounds_and_the_299_scans_arithmetic():
    null = load_script("benchmarks/null.py", "null_bench")
    # no false alarm: the one-sided upper bound is 1 - 0.05^(1/n)
    for n in (10, 200, 299, 300):
        assert null.clopper_pearson(0, n)[2] == pytest.approx(1 - 0.05 ** (1 / n))
    assert null.clopper_pearson(0, 298)[2] > 0.01 >= null.clopper_pearson(0, 299)[2]
    lower, upper, one_sided = null.clopper_pearson(3, 300)
    assert 0 < lower < 3 / 300 < one_sided < upper < 0.03


def test_summary_counts_false_alarms_and_p_values():
    null = load_script("benchmarks/null.py", "null_bench")
    rows = [{"status": status, "score": score, "p_values": p, "seconds": 10.0}
            for status, score, p in (("clean", 0.0, [0.5, 0.02]), ("clean", 0.3, [0.004]),
                                     ("backdoored", 0.995, [1e-4]), ("inconclusive", 0.1, []))]
    summary = null.summarise(rows, alpha=0.01)
    assert (summary["scans"], summary["false_alarms"], summary["inconclusive"]) == (4, 1, 1)
    assert (summary["p_values"], summary["p_at_most_0.05"], summary["p_at_most_0.01"]) == (
        4, 3, 2)
    assert not summary["bound_holds"] and summary["max_score"] == 0.995
    tasks = null.plan([{"name": "m", "path": "p", "recipe": "clean", "layers": 1}],
                      ["wikitext", "sst2"], seeds=3)
    assert len(tasks) == 6 and len({t["key"] for t in tasks}) == 6


def test_the_plan_goes_seed_by_seed_and_rows_of_older_code_are_not_counted(tmp_path):
    import json

    null = load_script("benchmarks/null.py", "null_bench")
    members = [{"name": n, "path": "p", "recipe": "clean", "layers": 1} for n in "ab"]
    first = [t["key"] for t in null.plan(members, ["wikitext"], seeds=2)][:2]
    assert first == ["a|wikitext|1", "b|wikitext|1"]   # both members before seed 2
    path = tmp_path / "null.jsonl"
    path.write_text("\n".join(json.dumps({"key": k, "preset_hash": h}) for k, h in (
        ("a|wikitext|1", null.preset_hash()), ("b|wikitext|1", "older0000000000"))))
    assert [r["key"] for r in null.read_results(path)] == ["a|wikitext|1"]
