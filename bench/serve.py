"""Serving many adapters at once, on SmolLM2-135M (CPU; --device cuda when one is there).

    python bench/serve.py                     # all three parts, one after the other
    python bench/serve.py --parts rows peft   # a subset

1. rows: decoding throughput (tokens/s) of a batch of 32 rows spread over 1, 8 and 32 adapters
   of one method (VeRA, (IA)³, Tied-LoRA, LoRA), relative to the same batch over 1 adapter.
   Target: >= 0.9x at 32 adapters for the shared-basis methods.
2. peft: LoRA mixed batches against PEFT's `adapter_names` (sub-batch per adapter) at 8 and 32
   adapters: the same 32 prompts, greedy, 32 new tokens; slimtune both ways (gathered matrices
   and grouped rows). Target: >= 2x PEFT's throughput.
3. server: `slimtune serve` with 8 LoRA adapters and, as the peer, `transformers serve` on the
   same model without adapters (continuous batching on); a load generator in a separate
   process sends N concurrent clients' completions (1, 8, 32), and reports tokens/s and
   p50/p99 latency.

Every part measures its variants alternately in one run and prints one JSON object.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

import slimtune
from slimtune.adapters.fast import rows as fast_rows
from slimtune.data.batches import collate
from slimtune.eval.generation import decode
from slimtune.models.load import convert_default

PROMPTS = ["Sort the numbers in ascending order: 80, 91, 95, 83, 81", "Convert to centimeters: 24 meters",
           "Ben buys 2 boxes with 8 pencils in each box. How many pencils?", "Name three colours.",
           "Write a haiku about the sea.", "What is the capital of France?", "Spell 'house' backwards.",
           "Give a synonym for 'quick'."]


def with_adapters(base, method: str, n: int, seed: int = 0):
    model = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        slimtune.add_adapter(model, slimtune.preset(method), name=f"a{i}")
        with torch.no_grad():
            for t in slimtune.trainable_parameters(model, f"a{i}").values():
                t.add_(0.01 * torch.randn(t.shape, generator=g))
    return model.eval()


def batch_of(tok, n: int = 32):
    ids = [tok(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(n)]
    return collate(ids, ids, tok.pad_token_id or 0, side="left")


@torch.no_grad()
def decode_rows(model, b, names, new_tokens: int) -> float:
    """Seconds to prefill and decode new_tokens for the batch, row i with adapter names[i]."""
    t0 = time.perf_counter()
    with slimtune.adapter_rows(model, names):
        decode(model, b["input_ids"], b["attention_mask"], max_new_tokens=new_tokens)
    return time.perf_counter() - t0


def part_rows(base, tok, args) -> dict:
    b = batch_of(tok, 32)
    out = {}
    for method in args.methods:
        models = {n: with_adapters(base, method, n) for n in (1, 8, 32)}
        times = {n: [] for n in models}
        for _ in range(args.reps):
            for n, m in models.items():  # alternated
                times[n].append(decode_rows(m, b, [f"a{i % n}" for i in range(32)], args.new_tokens))
        best = {n: min(t) for n, t in times.items()}
        out[method] = {f"{n}_adapters_tok_s": 32 * args.new_tokens / best[n] for n in best}
        out[method].update({f"ratio_{n}": best[1] / best[n] for n in (8, 32)})
        print(method, out[method], flush=True)
    return out


def part_peft(base, tok, args) -> dict:
    from peft import PeftModel

    b = batch_of(tok, 32)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for n in (8, 32):
            ours = with_adapters(base, "lora", n, seed=1)
            for i in range(n):
                slimtune.save_adapter(ours, Path(d) / f"n{n}" / f"a{i}", name=f"a{i}")
            peft = PeftModel.from_pretrained(copy.deepcopy(base), str(Path(d) / f"n{n}" / "a0"), adapter_name="a0")
            for i in range(1, n):
                peft.load_adapter(str(Path(d) / f"n{n}" / f"a{i}"), adapter_name=f"a{i}")
            peft.eval()
            names = [f"a{i % n}" for i in range(32)]

            @torch.no_grad()
            def run_peft():
                t0 = time.perf_counter()
                peft.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], adapter_names=names,
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id, top_k=None, top_p=None, temperature=None)
                return time.perf_counter() - t0

            def run_ours(gather: bool):
                fast_rows.GATHER_MATRICES = gather
                return decode_rows(ours, b, names, args.new_tokens)

            times = {"peft": [], "gather": []} | ({"grouped": []} if args.grouped else {})
            for _ in range(args.reps):
                times["peft"].append(run_peft())
                times["gather"].append(run_ours(True))
                if args.grouped:
                    times["grouped"].append(run_ours(False))
            fast_rows.GATHER_MATRICES = True
            best = {k: min(v) for k, v in times.items()}
            out[f"{n}_adapters"] = {f"{k}_tok_s": 32 * args.new_tokens / v for k, v in best.items()}
            out[f"{n}_adapters"].update({f"{k}_vs_peft": best["peft"] / best[k] for k in best if k != "peft"})
            print(n, out[f"{n}_adapters"], flush=True)
    return out


def load(url: str, models: list[str], clients: int, requests: int, max_tokens: int, ignore_eos: bool) -> dict:
    """The load generator (run in a process of its own): `clients` threads, completions.
    `ignore_eos` (vLLM's extension; transformers serve refuses unknown fields) makes every
    answer max_tokens long; tokens/s counts the tokens each server says it generated."""
    def one(i: int):
        body = json.dumps({"model": models[i % len(models)], "prompt": PROMPTS[i % len(PROMPTS)],
                           "max_tokens": max_tokens, "temperature": 0,
                           **({"ignore_eos": True} if ignore_eos else {})}).encode()
        t0 = time.perf_counter()
        req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            reply = json.loads(r.read())
        return time.perf_counter() - t0, reply.get("usage", {}).get("completion_tokens", 0)

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as ex:
        results = list(ex.map(one, range(requests)))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    return {"clients": clients, "requests": requests, "tokens": sum(r[1] for r in results),
            "tokens_per_s": sum(r[1] for r in results) / wall,
            "p50_s": lat[len(lat) // 2], "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def wait_up(url: str, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/v1/models", timeout=5).read()
            return
        except Exception:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def part_server(base, tok, args, model_dir: str) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as d:
        ours = with_adapters(base, "lora", 8, seed=2)
        specs = []
        for i in range(8):
            slimtune.save_adapter(ours, Path(d) / f"a{i}", name=f"a{i}")
            specs.append(f"a{i}={Path(d) / f'a{i}'}")
        servers = {
            "slimtune": ([sys.executable, "-m", "slimtune.cli", "serve", "--model", model_dir, "--port", "8731",
                          "--adapter", *specs, "--max_batch", "32", "--device", args.device], "http://127.0.0.1:8731",
                         [f"a{i}" for i in range(8)]),
            "transformers": (["transformers", "serve", model_dir, "--continuous-batching", "--port", "8732",
                              "--host", "127.0.0.1", "--device", args.device], "http://127.0.0.1:8732", [model_dir]),
        }
        for name, (cmd, url, models) in servers.items():
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                wait_up(url)
                rows = []
                for clients in (1, 8, 32):
                    code = (f"import json,sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import serve; "
                            f"print(json.dumps(serve.load({url!r}, {models!r}, {clients}, {max(clients * 2, 8)}, "
                            f"{args.new_tokens}, {name == 'slimtune'})))")
                    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
                    rows.append(json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0
                                else {"clients": clients, "error": res.stderr[-400:]})
                    print(name, rows[-1], flush=True)
                out[name] = rows
            except Exception as e:
                out[name] = {"error": f"{type(e).__name__}: {e}", "stderr": proc.stderr.read(2000).decode()
                             if proc.poll() is not None else ""}
            finally:
                proc.terminate()
                proc.wait(30)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["rows", "peft", "server"])
    ap.add_argument("--methods", nargs="+", default=["vera", "ia3", "tied-lora", "lora"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--grouped", action="store_true", help="also time LoRA rows grouped per adapter (slower)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model_dir = str(convert_default())
    base = slimtune.load_model(model_dir).to(args.device).eval()
    tok = slimtune.load_tokenizer(model_dir)
    res = {"device": args.device, "threads": torch.get_num_threads(), "new_tokens": args.new_tokens}
    if "rows" in args.parts:
        res["rows"] = part_rows(base, tok, args)
    if "peft" in args.parts:
        res["peft"] = part_peft(base, tok, args)
    if "server" in args.parts:
        res["server"] = part_server(base, tok, args, model_dir)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
