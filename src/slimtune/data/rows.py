"""Instruction data rows: read and validate them, as `Example`s.

Rows come from JSON (a list of objects) or JSONL files in one of three shapes:
    Alpaca   {"instruction", "input" (optional), "output"}
    chat     {"messages": [{"role", "content"}, ...]}   (the last message is the response)
    prompt   {"prompt", "completion"}
Every row is validated before training; the bad ones are reported together with file and
line, then skipped or fatal (`on_bad_rows`). The loss falls on the response tokens only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


from ..errors import Problems

IGNORE = -100  # label of a token that carries no loss (prompt, padding)
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One validated row: the conversation before the response, and the response."""

    messages: list[dict]  # the prompt turns (system / user / assistant ...), last one is user
    response: str
    instruction: str | None = None  # Alpaca rows keep their parts for the named templates
    input: str = ""
    where: str = ""  # "file:line", for messages


def _row_problem(row, where: str) -> tuple[str, str] | None:
    """(cause, fix) if the row is bad, else None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}", "write one object per row"
    def text(key, required=True, nonempty=False):
        v = row.get(key)
        if v is None:
            return (f"missing field {key!r}", f"add {key!r}") if required else None
        if not isinstance(v, str):
            return f"field {key!r} is {type(v).__name__}, not a string", f"make {key!r} a string"
        if nonempty and not v.strip():
            return f"field {key!r} is empty", "give it text or drop the row"
        return None
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            return "'messages' must be a list of at least 2 messages", "end it with an assistant message"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return (f"message {i} is not {{'role': one of {list(ROLES)}, 'content': string}}",
                        "fix that message")
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            return "the last message must be a non-empty assistant message (the response)", "add the response"
        return None
    if "prompt" in row or "completion" in row:
        return text("prompt") or text("completion", nonempty=True)
    if "instruction" in row or "output" in row:
        return text("instruction", nonempty=True) or text("input", required=False) or text("output", nonempty=True)
    return (f"unknown row shape with keys {sorted(row)}",
            "use Alpaca (instruction/input/output), chat (messages) or prompt/completion")


def to_example(row: dict, where: str = "") -> Example:
    if "messages" in row:
        return Example([dict(m) for m in row["messages"][:-1]], row["messages"][-1]["content"], where=where)
    if "prompt" in row:
        return Example([{"role": "user", "content": row["prompt"]}], row["completion"], where=where)
    inp = row.get("input") or ""
    user = row["instruction"] + (f"\n\n{inp}" if inp else "")
    return Example([{"role": "user", "content": user}], row["output"], row["instruction"], inp, where)


def _read_rows(path: Path):
    """(where, row-or-None, decode problem) for every row of a JSON or JSONL file."""
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the data
    if path.suffix == ".jsonl":
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                yield where, json.loads(line.decode("utf-8")), None
            except UnicodeDecodeError as e:
                yield where, None, (f"not UTF-8 ({e.reason} at byte {e.start})", "re-encode the file as UTF-8")
            except json.JSONDecodeError as e:
                yield where, None, (f"not valid JSON ({e.msg}, column {e.colno})", "fix the JSON on that line")
        return
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        yield f"{path}:{line}", None, (f"not UTF-8 ({e.reason})", "re-encode the file as UTF-8")
        return
    except json.JSONDecodeError as e:
        yield f"{path}:{e.lineno}", None, (f"not valid JSON ({e.msg})", "fix the JSON there")
        return
    if not isinstance(data, list):
        yield str(path), None, ("a .json file must hold a list of rows", "wrap the rows in [...] or use .jsonl")
        return
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row, None


HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name: a Hugging Face dataset


def _is_hub_name(p: Path) -> bool:
    """owner/name that is no local path: no file suffix of ours, no existing owner directory."""
    s = str(p)
    return bool(HUB_NAME.fullmatch(s)) and p.suffix not in (".json", ".jsonl") and not p.parent.exists()


def _hub_rows(name: str):
    """Rows of a hub dataset's train split (where the network allows), as (where, row, problem)."""
    try:
        import datasets
    except ImportError:
        yield name, None, ("it looks like a hub dataset name but the `datasets` package is not installed",
                           "pip install datasets, or give a local .json/.jsonl file")
        return
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # network, name, or format: say which
        yield name, None, (f"could not load it from the hub ({type(e).__name__}: {str(e)[:200]})",
                           "check the name and the network, or save the rows to a .jsonl file")
        return
    for i, row in enumerate(ds):
        yield f"{name}[{i}]", dict(row), None


def load_rows(paths: list[str | Path] | str | Path, on_bad_rows: str = "error") -> tuple[list[Example], list]:
    """Validate every row of every file. Returns (examples, skipped problems); with
    on_bad_rows='error' (the default) any bad row raises, all of them listed at once."""
    problems = Problems("bad training data")
    if on_bad_rows not in ("error", "skip"):
        problems.add(f"on_bad_rows={on_bad_rows!r}", "unknown policy", "use 'error' or 'skip'")
        problems.raise_if_any()
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    examples: list[Example] = []
    missing = Problems("bad training data")  # a missing file stops training whatever on_bad_rows says
    for p in map(Path, paths):
        if not p.exists() and _is_hub_name(p):
            for where, row, bad in _hub_rows(str(p)):
                bad = bad or _row_problem(row, where)
                problems.add(where, *bad) if bad else examples.append(to_example(row, where))
            continue
        if p.is_dir():
            missing.add(f"data file {str(p)!r}", "it is a directory", "name the .json or .jsonl files inside it")
            continue
        if not p.is_file():
            missing.add(f"data file {str(p)!r}", f"not found (looked in {Path.cwd()})" if not p.is_absolute()
                        else "not found", "check the path; give a .json or .jsonl file, or 'demo'")
            continue
        if p.suffix not in (".json", ".jsonl"):
            missing.add(f"data file {str(p)!r}", "not .json or .jsonl",
                        "give a .json (list of rows) or .jsonl (one row per line) file, or 'demo'")
            continue
        for where, row, bad in _read_rows(p):
            bad = bad or _row_problem(row, where)
            if bad:
                problems.add(where, *bad)
            else:
                examples.append(to_example(row, where))
    missing.raise_if_any()
    if problems.items and on_bad_rows == "error":
        problems.add(f"on_bad_rows={on_bad_rows!r}", f"{len(problems.items)} bad row(s) stop training",
                     "fix them, or pass --on_bad_rows skip to train on the valid rows")
        problems.raise_if_any()
    if not examples:
        problems.add(f"data {[str(p) for p in paths]}", "no valid row", "give at least one valid row")
        problems.raise_if_any()
    return examples, problems.items
