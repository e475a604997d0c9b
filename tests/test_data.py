"""Rows, templates, label masking and truncation."""

import json

import pytest

from slimtune import SlimtuneError
from slimtune.data import IGNORE, Example, collate, format_example, load_rows, tokenize
from slimtune.data.batches import split
from conftest import make_tokenizer

BAD = [  # (row as written in a .jsonl line, expected words in its message)
    ('{"instruction": "Add", "output": ""}', "field 'output' is empty"),
    ('{"instruction": 3, "output": "x"}', "field 'instruction' is int, not a string"),
    ('{"instruction": "Add"}', "missing field 'output'"),
    ('{"prompt": "hi"}', "missing field 'completion'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "at least 2 messages"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}',
     "last message must be a non-empty assistant"),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "message 0 is not"),
    ('{"question": "x"}', "unknown row shape"),
    ('[1, 2]', "expected a JSON object"),
    ('{"instruction": "Add", "output": "x"', "not valid JSON"),
]
GOOD = ['{"instruction": "Add 2 and 3.", "input": "", "output": "5"}',
        '{"prompt": "Say hi", "completion": "hi"}',
        '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, '
        '{"role": "assistant", "content": "Hello"}]}']


def write(tmp_path, lines, name="rows.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return p


@pytest.mark.parametrize("row,message", BAD)
def test_each_bad_row_is_named_with_file_and_line(tmp_path, row, message):
    p = write(tmp_path, GOOD + [row])
    with pytest.raises(SlimtuneError) as e:
        load_rows(p)
    assert f"{p}:4" in str(e.value) and message in str(e.value), str(e.value)


def test_not_utf8_is_reported(tmp_path):
    p = write(tmp_path, GOOD + [b'{"instruction": "caf\xe9", "output": "x"}'])
    with pytest.raises(SlimtuneError, match=f"{p}:4: not UTF-8"):
        load_rows(p)


def test_all_bad_rows_together_then_skip(tmp_path):
    p = write(tmp_path, [BAD[0][0]] + GOOD + [BAD[2][0]])
    with pytest.raises(SlimtuneError) as e:
        load_rows(p)
    assert f"{p}:1" in str(e.value) and f"{p}:5" in str(e.value) and "--on_bad_rows skip" in str(e.value)
    examples, skipped = load_rows(p, on_bad_rows="skip")
    assert len(examples) == 3 and len(skipped) == 2


def test_json_list_and_shapes(tmp_path):
    p = tmp_path / "rows.json"
    p.write_text(json.dumps([json.loads(g) for g in GOOD]))
    ex, _ = load_rows(p)
    assert [e.response for e in ex] == ["5", "hi", "Hello"]
    assert ex[2].messages[0] == {"role": "system", "content": "Be brief."}
    assert ex[0].instruction == "Add 2 and 3." and ex[0].messages == [{"role": "user", "content": "Add 2 and 3."}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("template", ["chat", "alpaca", "gist"])
def test_labels_cover_exactly_the_response(tok, template):
    ex = Example([{"role": "user", "content": "Add 2 and 3.\n\n2 3"}], "five", "Add 2 and 3.", "2 3")
    prompt, response = format_example(ex, template, tok)
    prep = tokenize([ex], tok, template, max_len=512)
    ids, labels = prep.input_ids[0], prep.labels[0]
    n_prompt = len(tok(prompt)["input_ids"])
    assert all(l == IGNORE for l in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:] and tok.decode(labels[n_prompt:]) == response
    assert response.rstrip("\n").endswith(tok.eos_token)
    if template == "gist":
        assert prompt == "Instruction: Add 2 and 3.\n<GIST>\nInput: 2 3\nOutput:"


def test_truncation_keeps_the_response_and_counts(tok):
    long = Example([{"role": "user", "content": "word " * 200}], "the answer")
    prep = tokenize([long], tok, "chat", max_len=40)
    ids, labels = prep.input_ids[0], prep.labels[0]
    assert len(ids) == 40 and tok.decode([l for l in labels if l != IGNORE]).startswith("the answer")
    assert prep.report["prompts_cut"] == 1 and prep.report["responses_cut"] == 0
    huge = Example([{"role": "user", "content": "q"}], "word " * 200)
    prep = tokenize([huge], tok, "chat", max_len=40)
    assert prep.report["responses_cut"] == 1 and sum(l != IGNORE for l in prep.labels[0]) > 0
    with pytest.raises(SlimtuneError, match="longer than max_len=40"):
        tokenize([long], tok, "chat", max_len=40, truncation="error")


def test_split_and_collate_are_deterministic():
    a = split(list(range(100)), 0.1, seed=3)
    assert a == split(list(range(100)), 0.1, seed=3) and len(a[1]) == 10 and not set(a[0]) & set(a[1])
    b = collate([[1, 2, 3], [4]], [[IGNORE, 2, 3], [4]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_hub_dataset_name_without_network_is_a_named_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SlimtuneError) as e:
        load_rows(["no-such-owner/no-such-dataset"])
    assert "no-such-owner/no-such-dataset" in str(e.value) and ("not installed" in str(e.value)
                                                                or "could not load it from the hub" in str(e.value))
