"""`benchmarks/reference_cost.py`: one row per model, what the match found and its seconds."""

from scripts_support import load_script

reference_cost = load_script("benchmarks/reference_cost.py")


def test_a_copy_matches_at_distance_zero_and_a_stranger_not_at_all(minilm_1layer,
                                                                   tiny_encoders, capsys):
    row = reference_cost.measure(minilm_1layer, minilm_1layer)
    assert row["distance"] == 0.0 and row["aligned"] == "no" and row["seconds"] >= 0
    stranger = reference_cost.measure(tiny_encoders["bert"], minilm_1layer)
    assert stranger["distance"] is None and stranger["most changed"] == "no reference matches"
    assert reference_cost.main([str(minilm_1layer), "--reference", str(minilm_1layer)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| model | seconds | distance") and len(table) == 3
