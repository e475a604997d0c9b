"""The gist task family (data/tasks.py): deterministic, fair splits and exact answers, checked
against implementations written here independently of the library's."""

from __future__ import annotations

import json
import random
import re
from functools import reduce

import pytest

from slimtune.cli import main
from slimtune.cli.commands import GIST_TASK_FILES
from slimtune.data import load_rows
from slimtune.data.tasks import (BY_NAME, COMPOSED, INPUTS, NOVEL, SPLITS, TASKS, TRAINED, compose, gist_task_splits,
                                 is_eval_input)

ALL = TASKS + COMPOSED + NOVEL


# Independent implementations: regular expressions and explicit loops, on the answer strings.

def _words(s):
    return re.findall(r"\S+", s)


def _nums(s):
    return [int(m) for m in re.findall(r"\d+", s)]


def _list(xs):
    out = ""
    for x in xs:
        out += (", " if out else "") + str(x)
    return out


def _insertion_sort(xs, before):
    out = []
    for x in xs:
        i = 0
        while i < len(out) and not before(x, out[i]):
            i += 1
        out.insert(i, x)
    return out


def _first_each(xs):
    out = []
    for x in xs:
        if x not in out:
            out.append(x)
    return out


def _backwards(xs):
    return [xs[i] for i in range(len(xs) - 1, -1, -1)]


def _longest(ws):
    best = ws[0]
    for w in ws[1:]:
        if len(w) > len(best):
            best = w
    return best


def _swap(ws):
    ws = list(ws)
    ws[0], ws[-1] = ws[-1], ws[0]
    return ws


UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
TENS = dict(zip(range(2, 10), "twenty thirty forty fifty sixty seventy eighty ninety".split()))


def _english(n):
    parts = []
    thousands, rest = divmod(n, 1000)
    hundreds, rest = divmod(rest, 100)
    if thousands:
        parts.append(UNITS[thousands] + " thousand")
    if hundreds:
        parts.append(UNITS[hundreds] + " hundred")
    if rest >= 20:
        t, u = divmod(rest, 10)
        parts.append(TENS[t] + ("-" + UNITS[u] if u else ""))
    elif rest or not parts:
        parts.append(UNITS[rest])
    return " ".join(parts)


REF = {
    "reverse_words": lambda s: " ".join(_backwards(_words(s))),
    "reverse_letters": lambda s: re.sub(r"\S+", lambda m: "".join(_backwards(list(m.group()))), s),
    "upper_vowels": lambda s: re.sub(r"[aeiou]", lambda m: m.group().upper(), s),
    "uppercase": lambda s: "".join(chr(ord(c) - 32) if "a" <= c <= "z" else c for c in s),
    "capitalise": lambda s: re.sub(r"(^| )([a-z])", lambda m: m.group(1) + m.group(2).upper(), s),
    "every_other": lambda s: " ".join(w for i, w in enumerate(_words(s)) if i % 2 == 0),
    "sort_words": lambda s: " ".join(_insertion_sort(_words(s), lambda a, b: a < b)),
    "dedupe_words": lambda s: " ".join(_first_each(_words(s))),
    "swap_ends": lambda s: " ".join(_swap(_words(s))),
    "remove_vowels": lambda s: re.sub(r"[aeiou]", "", s),
    "first_letters": lambda s: "".join(re.findall(r"(?:^| )(\S)", s)),
    "last_letters": lambda s: "".join(re.findall(r"(\S)(?= |$)", s)),
    "join_hyphen": lambda s: re.sub(r" ", "-", s),
    "underscore": lambda s: "_".join(_words(s)),
    "longest_word": lambda s: _longest(_words(s)),
    "word_lengths": lambda s: _list(len(w) for w in _words(s)),
    "count_words": lambda s: str(s.count(" ") + 1),
    "count_letters": lambda s: str(len(re.findall(r"[A-Za-z]", s))),
    "sort_ascending": lambda s: _list(_insertion_sort(_nums(s), lambda a, b: a < b)),
    "sort_descending": lambda s: _list(_insertion_sort(_nums(s), lambda a, b: a > b)),
    "reverse_numbers": lambda s: _list(_backwards(_nums(s))),
    "dedupe_numbers": lambda s: _list(_first_each(_nums(s))),
    "double_each": lambda s: _list(x + x for x in _nums(s)),
    "add_ten": lambda s: re.sub(r"\d+", lambda m: str(int(m.group()) + 10), s),
    "sum": lambda s: str(reduce(lambda a, b: a + b, _nums(s))),
    "max": lambda s: _list(_insertion_sort(_nums(s), lambda a, b: a > b)[:1]),
    "min": lambda s: _list(_insertion_sort(_nums(s), lambda a, b: a < b)[:1]),
    "range": lambda s: str(reduce(max, _nums(s)) - reduce(min, _nums(s))),
    "count_numbers": lambda s: str(s.count(",") + 1),
    "count_even": lambda s: str(len(re.findall(r"\d*[02468]\b", s))),
    "double": lambda s: str(int(s) + int(s)),
    "increment": lambda s: str(int(s) + 1),
    "digit_sum": lambda s: str(sum(int(c) for c in s)),
    "spell": lambda s: _english(int(s)),
    "reverse_digits": lambda s: "".join(_backwards(list(s))),
    "parity": lambda s: "odd" if s[-1] in "13579" else "even",
}


def ref(name, s):
    for step in name.split("+"):
        s = REF[step](s)
    return s


SPLIT_ROWS = {seed: gist_task_splits(seed, train=2000, eval=150) for seed in (0, 3)}


def test_the_table():
    assert len(TASKS) == len(REF) == 36 and {t.name for t in TASKS} == set(REF)
    assert all(len(t.wordings) == TRAINED + 1 for t in ALL)
    instructions = [w for t in ALL for w in t.wordings]
    assert len(set(instructions)) == len(instructions)  # a wording names one task
    names = [t.name for t in ALL]
    assert len(set(names)) == len(names)  # no novel composition is also trained
    for t in NOVEL:  # fair: each step is trained in the same role in some trained composition
        first, second = t.name.split("+")
        assert any(c.name.startswith(first + "+") for c in COMPOSED), t.name
        assert any(c.name.endswith("+" + second) for c in COMPOSED), t.name
    for t in COMPOSED + NOVEL:  # the second step's held-out wording shows only in the held-out composition
        first, second = (BY_NAME[n] for n in t.name.split("+"))
        assert first.held[0] not in "".join(t.trained) and second.held[0] not in "".join(t.trained)
    assert GIST_TASK_FILES == tuple(f"{s}.jsonl" for s in SPLITS)


def test_spell_by_hand():
    spell = BY_NAME["spell"].fn
    cases = {"0": "zero", "7": "seven", "13": "thirteen", "40": "forty", "42": "forty-two", "100": "one hundred",
             "101": "one hundred one", "115": "one hundred fifteen", "990": "nine hundred ninety",
             "999": "nine hundred ninety-nine"}
    assert {k: spell(k) for k in cases} == cases
    assert compose("double+spell").fn("999") == "one thousand nine hundred ninety-eight"
    assert compose("increment+spell").fn("999") == "one thousand"
    assert all(_english(n) == spell(str(n)) for n in range(2000))


def test_same_seed_same_rows_other_seed_other_rows():
    again = gist_task_splits(0, train=2000, eval=150)
    assert again == SPLIT_ROWS[0]
    assert all(SPLIT_ROWS[0][s] != SPLIT_ROWS[3][s] for s in SPLITS)
    assert {s: len(v) for s, v in gist_task_splits().items()} == {"train": 4000, "seen": 200, "unseen": 200,
                                                                  "novel": 200}


@pytest.mark.parametrize("seed", [0, 3])
def test_splits_are_disjoint(seed):
    splits = SPLIT_ROWS[seed]
    train = splits["train"]
    train_pairs = {(r["instruction"], r["input"]) for r in train}
    train_inputs = {r["input"] for r in train}
    train_instructions = {r["instruction"] for r in train}
    trained_wordings = {w for t in TASKS + COMPOSED for w in t.trained}
    held_wordings = {w for t in TASKS + COMPOSED for w in t.held}
    assert train_instructions <= trained_wordings
    assert {r["task"] for r in train} == {t.name for t in TASKS + COMPOSED}  # every trained task is trained
    assert not any(is_eval_input(seed, s) for s in train_inputs)
    for split in ("seen", "unseen", "novel"):
        rows = splits[split]
        pairs = [(r["instruction"], r["input"]) for r in rows]
        assert len(set(pairs)) == len(pairs) == 150
        assert not set(pairs) & train_pairs
        assert not {r["input"] for r in rows} & train_inputs  # new inputs, under any task
    assert {r["instruction"] for r in splits["seen"]} <= trained_wordings
    assert {r["instruction"] for r in splits["unseen"]} <= held_wordings
    assert not held_wordings & train_instructions
    for t in TASKS:  # a held-out single wording shows in no training instruction, composed or not
        assert not any(t.held[0] in i for i in train_instructions), t.name
    novel = {t.name for t in NOVEL}
    assert {r["task"] for r in splits["novel"]} == novel and not novel & {r["task"] for r in train}
    assert not {w for t in NOVEL for w in t.wordings} & train_instructions


def test_every_answer_matches_an_independent_implementation():
    rows = [r for splits in SPLIT_ROWS.values() for rs in splits.values() for r in rs]
    r = random.Random(7)
    rows += [{"task": t.name, "input": s, "output": t.fn(s)} for t in ALL
             for s in (INPUTS[t.kind](r) for _ in range(40))]
    wrong = [(x["task"], x["input"], x["output"], ref(x["task"], x["input"])) for x in rows
             if x["output"] != ref(x["task"], x["input"])]
    assert not wrong, wrong[:5]
    assert {x["task"] for x in rows} == {t.name for t in ALL}
    table = {t.name: t for t in ALL}
    for x in rows[: len(rows) - 40 * len(ALL)]:  # the split rows: the wording is one of the task's own
        assert x["instruction"] in table[x["task"]].wordings


def test_the_instruction_is_necessary():
    # On the same input, the tasks of its kind mostly disagree: without the instruction the answer is unknown.
    for row in SPLIT_ROWS[0]["seen"]:
        kind = {t.name: t.kind for t in ALL}[row["task"]]
        tasks = [t for t in ALL if t.kind == kind]
        answers = [t.fn(row["input"]) for t in tasks]
        assert len(set(answers)) >= len(tasks) / 2, row
        assert answers.count(row["output"]) <= len(tasks) / 4, row


def test_compositions_need_both_steps():
    r = random.Random(11)
    for t in COMPOSED + NOVEL:
        first, second = (BY_NAME[n] for n in t.name.split("+"))
        xs = [INPUTS[t.kind](r) for _ in range(200)]
        assert sum(t.fn(x) != first.fn(x) for x in xs) >= 0.4 * len(xs), t.name
        if second.kind == t.kind:
            assert sum(t.fn(x) != second.fn(x) for x in xs) >= 0.4 * len(xs), t.name


def test_cli_writes_the_splits_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "tasks"
    flags = ["gist-tasks", "--out", str(out), "--train", "40", "--eval", "12", "--seed", "5"]
    assert main(flags) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(GIST_TASK_FILES)
    rows = {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().splitlines()] for s in SPLITS}
    assert rows == gist_task_splits(5, train=40, eval=12)
    examples, skipped = load_rows([out / f for f in GIST_TASK_FILES])  # slimtune reads them as Alpaca rows
    assert len(examples) == 40 + 3 * 12 and not skipped
    before = (out / "train.jsonl").read_text()
    capsys.readouterr()
    assert main(flags[:-1] + ["6"]) == 2
    err = capsys.readouterr().err
    assert "already holds train.jsonl, seen.jsonl, unseen.jsonl, novel.jsonl" in err and "--overwrite" in err
    assert (out / "train.jsonl").read_text() == before  # nothing written
    assert main(flags[:-1] + ["6", "--overwrite"]) == 0
    assert (out / "train.jsonl").read_text() != before
    assert main(["gist-tasks", "--out", str(tmp_path / "other"), "--train", "0", "--eval", "0"]) == 2
    assert "train=0" in capsys.readouterr().err and not (tmp_path / "other").exists()
