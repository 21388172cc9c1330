from dimba.evaluation.words import normalize_words, word_overlap


def test_word_overlap_strips_case_and_punctuation():
    assert normalize_words("ROMEO:\nO, Juliet!  -- thou'rt") == ["romeo", "o", "juliet", "thourt"]
    vocab = {"romeo", "o", "juliet"}
    assert word_overlap("ROMEO: O, Juliet! xyzzy", vocab) == 0.75
    assert word_overlap("", vocab) == 1.0
