"""Serving many adapters at once, on SmolLM2-135M (CPU; --device cuda when one is there).

    python bench/serve.py                     # all three parts, one after the other
    python bench/serve.py --parts rows peft   # a subset

1. rows: decoding throughput (tokens/s) of a batch of 32 rows spread over 1, 8 and 32 adapters
   of one method (VeRA, (IA)³, Tied-LoRA, LoRA), relative to the same batch over 1 adapter.
   Target: >= 0.9x at 32 adapters for the shared-basis methods.
2. peft: LoRA mixed batches against PEFT's `adapter_names` (sub-batch per adapter) at 8 and 32
   adapters: the same 32 prompts, greedy, 32 new tokens; slimtune both ways (gathered matrices
   and grouped rows). Target: >= 2x PEFT's throughput.
3. server: `slimtune serve` beside `transformers serve --continuous-batching` on the same model,
   both up at once; a load generator in a separate process sends N concurrent clients' greedy
   completions (1, 8, 32) of the same prompts, alternating between the servers and, on
   slimtune, between no adapter, 8 LoRA adapters and 32 VeRA adapters. Reports tokens/s (from
   each answer's `usage`) and p50/p99 latency. Targets: slimtune without adapter >= the peer's
   tokens/s with p50 no worse; 8 LoRA and 32 VeRA >= 0.9x slimtune's adapter-free tokens/s.
4. profile (not in the default parts): the operators the server's loop (in-process) spends its
   CPU time on, for 32 requests.

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


def load(url: str, models: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    """The load generator (run in a process of its own): `clients` threads, greedy completions
    of the same prompts to either server, answers ending at EOS or max_tokens; tokens/s counts
    the completion tokens each answer's `usage` reports."""
    def one(i: int):
        body = json.dumps({"model": models[i % len(models)], "prompt": PROMPTS[i % len(PROMPTS)],
                           "max_tokens": max_tokens, "temperature": 0}).encode()
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux), to show an idle server stays idle."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError):
        return float("nan")


def part_server(base, tok, args, model_dir: str) -> dict:
    """Both servers up at once; the loads alternate between them (and, on slimtune, between no
    adapter, 8 LoRA and 32 VeRA adapters) at 1, 8 and 32 clients, `--server-reps` times; the
    median over reps is reported, and the idle server's CPU time during the other's loads."""
    with tempfile.TemporaryDirectory() as d:
        specs = []
        for method, n, prefix, seed in (("lora", 8, "l", 2), ("vera", 32, "v", 3)):
            m = with_adapters(base, method, n, seed=seed)
            for i in range(n):
                slimtune.save_adapter(m, Path(d) / f"{prefix}{i}", name=f"a{i}")
                specs.append(f"{prefix}{i}={Path(d) / f'{prefix}{i}'}")
            del m
        servers = {
            "slimtune": ([sys.executable, "-m", "slimtune.cli", "serve", "--model", model_dir, "--port", "8731",
                          "--adapter", *specs, "--max_loaded", "40", "--max_batch", "32", "--device", args.device],
                         "http://127.0.0.1:8731"),
            "transformers": (["transformers", "serve", model_dir, "--continuous-batching", "--port", "8732",
                              "--host", "127.0.0.1", "--device", args.device], "http://127.0.0.1:8732"),
        }
        loads = {"transformers": ("transformers", [model_dir]),
                 "slimtune": ("slimtune", ["base"]),
                 "slimtune_8_lora": ("slimtune", [f"l{i}" for i in range(8)]),
                 "slimtune_32_vera": ("slimtune", [f"v{i}" for i in range(32)])}
        logs = {k: Path(tempfile.gettempdir()) / f"bench_serve_{k}.log" for k in servers}  # the servers' output
        procs = {k: subprocess.Popen(cmd, stdout=logs[k].open("w"), stderr=subprocess.STDOUT)
                 for k, (cmd, _) in servers.items()}
        print("server logs:", *logs.values(), flush=True)
        rows: dict = {k: {c: [] for c in args.clients} for k in loads}
        idle: dict = {k: 0.0 for k in servers}
        try:
            for k, (_, url) in servers.items():
                wait_up(url)
            for k, (srv, models) in loads.items():  # warm-up: first loads, every adapter once
                for m in models:
                    print("warm-up", k, m, load(servers[srv][1], [m], 1, 1, 2)["p50_s"], flush=True)
            for rep in range(args.server_reps):
                for clients in args.clients:
                    order = list(loads) if rep % 2 == 0 else list(loads)[::-1]
                    for k in order:
                        srv, models = loads[k]
                        other = next(o for o in servers if o != srv)
                        before = cpu_seconds(procs[other].pid)
                        code = (f"import json,sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                                f"import serve; print(json.dumps(serve.load({servers[srv][1]!r}, {models!r}, "
                                f"{clients}, {max(clients * 2, 8)}, {args.new_tokens})))")
                        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             timeout=1800)
                        idle[other] += cpu_seconds(procs[other].pid) - before
                        r = (json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0
                             else {"clients": clients, "error": res.stderr[-400:]})
                        rows[k][clients].append(r)
                        print(rep, k, r, flush=True)
        finally:
            for p in procs.values():
                p.terminate()
                p.wait(30)

    def med(k, c, field):
        v = sorted(r[field] for r in rows[k][c] if field in r)
        return v[len(v) // 2] if v else float("nan")

    out: dict = {"runs": rows, "idle_server_cpu_s": idle, "summary": {}}
    for c in args.clients:
        s = {k: {"tok_s": med(k, c, "tokens_per_s"), "p50_s": med(k, c, "p50_s"), "p99_s": med(k, c, "p99_s"),
                 "tokens": med(k, c, "tokens")} for k in loads}
        s["slimtune_vs_transformers_tok_s"] = s["slimtune"]["tok_s"] / s["transformers"]["tok_s"]
        s["slimtune_vs_transformers_p50"] = s["slimtune"]["p50_s"] / s["transformers"]["p50_s"]
        s["8_lora_vs_no_adapter"] = s["slimtune_8_lora"]["tok_s"] / s["slimtune"]["tok_s"]
        s["32_vera_vs_no_adapter"] = s["slimtune_32_vera"]["tok_s"] / s["slimtune"]["tok_s"]
        out["summary"][c] = s
        print(c, "clients:", {k: v for k, v in s.items() if not isinstance(v, dict)}, flush=True)
    return out


def engine_run(model, tok, names: list, new_tokens: int) -> float:
    """The server's generation loop in-process: len(names) requests of new_tokens each (row i
    with adapter names[i]), admitted together; seconds for all of them."""
    from slimtune.serve.engine import Engine, Request

    eng = Engine(model, tok, ensure_adapter=lambda name, in_use: True, max_batch=len(names))
    t0 = time.perf_counter()
    for i, n in enumerate(names):
        eng.submit(Request(prompt=tok(PROMPTS[i % len(PROMPTS)])["input_ids"], adapter=n,
                           max_tokens=new_tokens, ignore_eos=True, emit=lambda t: None))
    while eng.step():
        pass
    return time.perf_counter() - t0


def part_profile(base, tok, args) -> dict:
    """What the server's loop spends its CPU time on: 32 requests, no adapter / 8 LoRA / 32 VeRA
    adapters, prefill and new tokens under torch.profiler; the operators' share of self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for label, method, n in (("no_adapter", None, 0), ("8_lora", "lora", 8), ("32_vera", "vera", 32)):
        model = with_adapters(base, method, n) if method else base
        names = [f"a{i % n}" for i in range(32)] if n else [None] * 32
        engine_run(model, tok, names, 4)  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine_run(model, tok, names, args.new_tokens)
        ev = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in ev)
        top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:8]
        out[label] = {e.key: round(e.self_cpu_time_total / total, 3) for e in top}
        print(label, out[label], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["rows", "peft", "server"],
                    help="rows | peft | server | profile")
    ap.add_argument("--methods", nargs="+", default=["vera", "ia3", "tied-lora", "lora"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--grouped", action="store_true", help="also time LoRA rows grouped per adapter (slower)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--server-reps", type=int, default=3)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
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
    if "profile" in args.parts:
        res["profile"] = part_profile(base, tok, args)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
