"""Scoring against naive references computed here."""

import pytest

from slimtune.data.batches import Prepared, pack
from slimtune.eval.metrics import exact_match, final_number, rouge_l


def naive_rouge_l(pred: str, ref: str) -> float:
    """LCS-based F-measure over lower-cased whitespace tokens (no stemming needed for these words)."""
    p, r = pred.lower().split(), ref.lower().split()
    table = [[0] * (len(r) + 1) for _ in range(len(p) + 1)]
    for i in range(len(p)):
        for j in range(len(r)):
            table[i + 1][j + 1] = table[i][j] + 1 if p[i] == r[j] else max(table[i][j + 1], table[i + 1][j])
    lcs = table[-1][-1]
    if not lcs:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


@pytest.mark.parametrize("pred,ref", [("the cat sat on the mat", "the cat lay on a mat"),
                                      ("blue red green", "green red blue"), ("a b c", "x y z"),
                                      ("one two three four", "one two three four")])
def test_rouge_l_matches_a_naive_lcs(pred, ref):
    assert rouge_l([pred], [ref])[0] == pytest.approx(naive_rouge_l(pred, ref))


def test_rouge_l_stems():
    assert rouge_l(["the dogs running"], ["the dog runs"])[0] == pytest.approx(1.0)


@pytest.mark.parametrize("pred,ref,em", [
    ("25", "25", 1.0), ("The answer is 25.", "25", 1.0), ("24", "25", 0.0),
    ("so 3 + 4 = 7 #### 7", "Natalia sold 48... #### 7", 1.0), ("1,000 meters", "1000", 1.0),
    ("HELLO WORLD", "HELLO WORLD", 1.0), ("hello world", "HELLO WORLD", 0.0), ("07/03/2024.", "07/03/2024", 1.0),
    ("river-garden ", "river-garden", 1.0), ("no number", "12", 0.0),
])
def test_exact_match(pred, ref, em):
    assert exact_match(pred, ref) == em


def test_final_number():
    assert final_number("a 3 then 4.5") == 4.5 and final_number("#### -12") == -12 and final_number("none") is None


def test_packing_keeps_examples_whole():
    prep = Prepared([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]], [[-100, 2, 3], [-100, 5], [-100, -100, 8, 9], [10]])
    packed = pack(prep, max_len=5)
    assert packed.input_ids == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    # an example's first label is never predicted, alone or packed: IGNORE (10 starts an example)
    assert packed.labels == [[-100, 2, 3, -100, 5], [-100, -100, 8, 9, -100]]
    assert packed.segments == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]
