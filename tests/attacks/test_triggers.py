import pytest

from sanitator.attacks.triggers import (
    PAPER_TRIGGERS,
    draw_triggers,
    read_word_list,
    validate_triggers,
    wikitext_rare_words,
)


def test_paper_triggers():
    assert PAPER_TRIGGERS == ("cf", "mn", "tq", "qt", "mm", "pt")


def test_default_word_list_is_rare_lowercase_wikitext_vocabulary():
    words = wikitext_rare_words()
    assert len(words) > 1000
    assert list(words) == sorted(words)
    assert all(word.isalpha() and word.islower() and 4 <= len(word) <= 10 for word in words)
    assert "the" not in words and "with" not in words  # frequent words are excluded


def test_draws_are_seeded_distinct_and_one_or_two_words():
    first = draw_triggers(6, seed=3)
    assert first == draw_triggers(6, seed=3)
    assert first != draw_triggers(6, seed=4)
    assert len(set(first)) == 6
    assert all(1 <= len(trigger.split()) <= 2 for trigger in first)
    words = [word for trigger in first for word in trigger.split()]
    assert len(words) == len(set(words))  # triggers never share a word


def test_two_word_probability_extremes():
    words = tuple(f"word{letter}" for letter in "abcdefghijkl")
    assert all(" " not in t for t in draw_triggers(4, 0, words=words, two_word_probability=0))
    assert all(len(t.split()) == 2
               for t in draw_triggers(4, 0, words=words, two_word_probability=1))


def test_word_list_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# comment\nalpha\n\nbeta\nalpha\ngamma\ndelta\n")
    words = read_word_list(path)
    assert words == ("alpha", "beta", "delta", "gamma")
    assert set(" ".join(draw_triggers(2, 1, words=words)).split()) <= set(words)
    with pytest.raises(ValueError, match="too small"):
        draw_triggers(3, 1, words=words)


def test_validate_triggers():
    assert validate_triggers([" cf ", "mn"]) == ["cf", "mn"]
    for bad in ([], ["cf", ""], ["cf", "cf"]):
        with pytest.raises(ValueError):
            validate_triggers(bad)
