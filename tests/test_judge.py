"""Judge scoring. The parser is tested here; the real-server test is opt-in (it needs
llama-cpp-python's server, a 10-20 minute build): set SLIMTUNE_LLAMA_SERVER_PYTHON to a
Python that has `llama_cpp.server` installed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from slimtune.eval.judge import _field

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.parametrize("text,key,value", [
    ('{"explanation": "ok", "score": 7}', "score", 7),
    ('```json\n{"score": 3}\n```', "score", 3),
    ("The answer is fine. Rating: [[8]]", "score", "8"),
    ('{"winner": "B", "explanation": "b is right"}', "winner", "B"),
    ("I think [[A]] is better", "winner", "A"),
    ("no verdict here", "score", None),
])
def test_verdict_parsing(text, key, value):
    assert _field(text, key) == value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server():
    python = os.environ.get("SLIMTUNE_LLAMA_SERVER_PYTHON")
    if not python:
        pytest.skip("opt-in: set SLIMTUNE_LLAMA_SERVER_PYTHON to a Python with llama-cpp-python[server]")
    from slimtune.models.load import default_gguf

    port = _free_port()
    proc = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", str(default_gguf()), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "4096", "--model_alias", "smollm2-judge"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/models", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("llama_cpp.server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_judge_against_a_real_openai_compatible_server(llama_server, tmp_path):
    import slimtune
    from slimtune.recipes.evaluate import run_eval

    questions = DATA / "vicuna_bench" / "question.jsonl"
    if not questions.is_file():
        pytest.skip(f"{questions} not present")
    common = dict(data=[str(questions)], limit=6, max_new_tokens=64, judge_url=llama_server, judge_model="smollm2-judge")
    a = run_eval(slimtune.EvalConfig(**common, out=str(tmp_path / "greedy.jsonl")))
    b = run_eval(slimtune.EvalConfig(**common, out=str(tmp_path / "sampled.jsonl"), do_sample=True,
                                     pairwise_against=str(tmp_path / "greedy.jsonl")))
    assert a["judge_scored"] + a["judge_unparseable"] == 6
    assert b["pairwise_judged"] + b["judge_unparseable"] - (6 - b["judge_scored"]) == 6
    rows = [json.loads(x) for x in (tmp_path / "sampled.jsonl").read_text().splitlines()]
    assert all(r["judge_score"] is None or 1 <= r["judge_score"] <= 10 for r in rows)
    assert all(r["pairwise"] in (None, 0.0, 0.5, 1.0) for r in rows)
    print("\nJUDGE RUN", json.dumps({"greedy": a, "sampled_vs_greedy": b}, indent=1))
    for r in rows[:3]:
        print("VERDICTS", json.dumps({k: r[k] for k in ("judge_verdict", "pairwise_verdict")})[:600])
