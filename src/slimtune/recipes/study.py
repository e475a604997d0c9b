"""`slimtune study`: every method on one base model, one training mix and one budget, each
learning rate chosen on a validation slice of the training mix, every run evaluated the same
way, and a page that compares them (recipes/study_report.py).

    slimtune study                          # the default grid on SmolLM2-135M, 2 CPU cores: ~3 hours
    slimtune study --scale 4 --device cuda  # 4x the steps and the evaluation rows
    slimtune study --config grid.yaml       # another grid, data mix or budget

The stages, each resumable (results.jsonl holds what is done; a finished run is skipped, an
interrupted one resumes from its checkpoint, results are appended as they land):

1. data: the training mix (GSM8K, GPTeacher role-play and tool use, the Self-Instruct seed
   tasks, the demo data) with a validation slice held out of it, and the evaluation sets:
   Alpaca+ seen/unseen/human (ROUGE-L), held-out GSM8K items never trained on (exact match of
   the final number), the demo's held-out rows (exact match);
2. sweep: each method at its learning rates times each of `lr_multipliers`, for
   `sweep_fraction` of the budget; the winner has the lowest validation loss. A method's sweep
   runs train together, one batch per step over one base (`slimtune train --jobs`,
   `sweep_jobs`); the page reports the time that saved;
3. final: each method at its winner for the whole budget (the `noise_seeds` cheapest methods
   with `seeds` seeds), then evaluated;
4. the page: docs/study.md (table, Pareto plot, validation curves, the papers' claims).

Each training run is a `slimtune train` process of its own (`torchrun --nproc_per_node N`
with `nproc` > 1: data parallelism), so that its peak memory is its own and a failed run
fails alone (it is recorded, and the study goes on).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..adapters.helpers import count_parameters
from ..adapters.inject import add_adapter
from ..adapters.registry import is_method, preset_config
from ..configs import at_least, choice, field, from_dict
from ..data.demo import demo_split
from ..errors import Problems
from ..eval.config import EvalConfig
from ..formats.adapter import load_adapter
from ..models.load import build_on_meta, load_model, load_tokenizer, resolve_device
from ..errors import SlimtuneError
from ..train.config import PRECISIONS, train_config
from .evaluate import run_eval
from .jobs import run_jobs
from .study_report import write_page
from .train import evaluate_before, run_training

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"  # a checkout's ../shared/data


@dataclass
class GridEntry:
    """One method of the grid: a preset with adapter overrides, and the learning rates the sweep
    centres on (null: TrainConfig's defaults, 1e-3 for matrices and 1e-2 for vectors)."""

    name: str = field("lora-r8", "the row's name in the table")
    method: str = field("lora", "adapter preset; 'base' = the untrained model (evaluated only)")
    adapter: dict[str, Any] = field({}, "overrides of the preset, e.g. {r: 64}")
    lr: float | None = field(None, "centre of the matrices' learning rate sweep")
    lr_vectors: float | None = field(None, "centre of the vectors' learning rate sweep")


def default_grid() -> list[GridEntry]:
    return [GridEntry("base", "base"), GridEntry("lora-r8", "lora", {"r": 8}), GridEntry("lora-r64", "lora", {"r": 64}),
            GridEntry("vera-r256", "vera", {"r": 256}), GridEntry("vera-r1024", "vera", {"r": 1024}),
            GridEntry("tied-lora-tl5", "tied-lora-ba"), GridEntry("tied-lora-vbua", "tied-lora"),
            GridEntry("tied-lora-paper", "tied-lora-paper"), GridEntry("ia3", "ia3"),
            GridEntry("mov-10", "mov", {"experts": 10}), GridEntry("molora-10x4", "molora", {"experts": 10, "r": 4}),
            GridEntry("mixlora", "mixlora"), GridEntry("pesc-8", "pesc", {"experts": 8}),
            GridEntry("full", "full", lr=5e-5)]


@dataclass
class StudyConfig:
    """What `slimtune study` runs: the grid, the data, the budget, the evaluation."""

    model: str = field("smollm2-135m", "base model: 'smollm2-135m' or a local directory")
    grid: list[GridEntry] = field(default_grid(), "the methods compared (name, method, adapter, lr, lr_vectors)")
    mix: list[str] = field(["gsm8k", "gpteacher", "self_instruct", "demo"], "training mix sources: gsm8k, "
                           "gpteacher, self_instruct, demo")
    shared_data: str = field(str(SHARED), "the directory of the shared data sets (Alpaca+, GSM8K, GPTeacher, ...)")
    train_rows: int = field(2000, "rows of the training mix (before scale)")
    val_rows: int = field(64, "validation rows held out of the training mix: the sweep's choice, held-out loss")
    steps: int = field(48, "optimiser steps of a final run (times scale)")
    batch_size: int = field(8, "examples per step")
    max_len: int = field(192, "longest example in tokens")
    sweep_fraction: float = field(0.25, "share of the steps a sweep run trains")
    lr_multipliers: list[float] = field([1 / 3, 1.0, 3.0], "the sweep: every learning rate of a method times each")
    seeds: int = field(3, "seeds of the noise methods' final runs")
    noise_seeds: int = field(4, "how many of the cheapest methods (fewest trainable parameters) run `seeds` seeds")
    eval_rows: int = field(20, "rows per evaluation set: each Alpaca+ split, GSM8K, demo (times scale)")
    max_new_tokens: int = field(48, "generation length of the evaluation")
    scale: float = field(1.0, "multiplies steps, training rows and evaluation rows: a budget for a bigger machine")
    judge_url: str | None = field(None, "an OpenAI-compatible judge: adds judge scores on the 80 Vicuna questions")
    judge_model: str = field("judge", "model name sent to the judge")
    device: str = field("auto", "auto | cpu | cuda | cuda:N")
    precision: str = field("auto", "each run's training precision: fp32 | bf16 (autocast; on a CPU, worth it "
                           "where it has bf16 instructions) | auto (bf16 on a GPU that has it, else fp32)")
    nproc: int = field(1, "processes per training run (torchrun, data parallel); 1 = a plain process")
    sweep_jobs: bool = field(True, "train a method's sweep runs together over one base, one batch per step "
                             "(`slimtune train --jobs`); false: one run after another")
    retry_failed: bool = field(False, "run again the stages recorded as failed (after fixing their cause); "
                               "otherwise a failed stage is a result and is not rerun")
    in_process: bool = field(False, "train in this process instead of one process per run (no peak memory per "
                             "run; for tests)")
    out: str = field("runs/study", "where the runs, their checkpoints and the data go")
    page: str = field("docs/study.md", "the page written from the results (its images go beside it, in img/)")
    results: str = field("", "the record of finished stages (JSONL), from which the page is written; empty: "
                         "beside the page (docs/study.jsonl), to be committed with it")

    @property
    def results_path(self) -> Path:
        return Path(self.results) if self.results else Path(self.page).with_suffix(".jsonl")

    def problems(self, p: Problems) -> None:
        for name in ("steps", "batch_size", "max_len", "seeds", "eval_rows", "max_new_tokens", "nproc", "train_rows"):
            at_least(p, name, getattr(self, name), 1)
        at_least(p, "val_rows", self.val_rows, 1)
        at_least(p, "noise_seeds", self.noise_seeds, 0)
        if not 0 < self.sweep_fraction <= 1:
            p.add(f"sweep_fraction={self.sweep_fraction}", "a share of the budget in (0, 1]", "give e.g. 0.25")
        if not self.scale > 0:
            p.add(f"scale={self.scale}", "must be positive", "give e.g. 1 or 4")
        if not self.lr_multipliers or any(not m > 0 for m in self.lr_multipliers):
            p.add(f"lr_multipliers={self.lr_multipliers}", "positive factors are needed", "give e.g. [0.333, 1, 3]")
        choice(p, "precision", self.precision, PRECISIONS)
        unknown = sorted(set(self.mix) - set(SOURCES))
        if unknown:
            p.add(f"mix={self.mix}", f"unknown sources {unknown}", f"use {sorted(SOURCES)}")

    def scaled(self, n: int) -> int:
        return max(1, round(n * self.scale))


def grid_problems(grid: list[GridEntry], p: Problems) -> None:
    names = [g.name for g in grid]
    for g in grid:
        if g.method != "base" and not is_method(g.method):
            p.add(f"grid: {g.name} method={g.method!r}", "not an adapter preset", "use one of slimtune's presets")
    if len(set(names)) != len(names):
        p.add(f"grid names {names}", "two rows share a name", "give each row its own name")
    for g in grid:
        for name in ("lr", "lr_vectors"):
            value = getattr(g, name)
            if value is not None and not value > 0:
                p.add(f"grid: {g.name} {name}={value}", "a learning rate must be positive", "give a value > 0 or null")


# ---- data -------------------------------------------------------------------------------------------

def _gsm8k(shared: Path) -> list[dict]:
    return json.loads((shared / "gsm8k" / "train.json").read_text())


def _gpteacher(shared: Path) -> list[dict]:
    return [r for name in ("roleplay", "toolformer") for r in json.loads((shared / "gpteacher" / f"{name}.json").read_text())]


def _self_instruct(shared: Path) -> list[dict]:
    rows = []
    for line in (shared / "self_instruct" / "seed_tasks.jsonl").read_text().splitlines():
        task = json.loads(line)
        rows += [{"instruction": task["instruction"], "input": i["input"], "output": i["output"]} for i in task["instances"]]
    return rows


def _demo(shared: Path) -> list[dict]:
    return [{k: r[k] for k in ("instruction", "input", "output") if k in r} for r in demo_split(2000, 1)[0]]


SOURCES = {"gsm8k": _gsm8k, "gpteacher": _gpteacher, "self_instruct": _self_instruct, "demo": _demo}
GSM8K_HELD_OUT = 500  # the last 500 GSM8K training items are never trained: the GSM8K evaluation


def write_data(cfg: StudyConfig, out: Path) -> dict[str, Path]:
    """The training mix, its validation slice and the evaluation sets, as JSONL under out
    (written once: a resumed study reads the same files)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / f"{name}.jsonl" for name in ("train", "val", "gsm8k", "alpaca_seen", "alpaca_unseen",
                                                      "alpaca_human")}
    if all(f.is_file() for f in files.values()):
        return files
    shared = Path(cfg.shared_data)
    p = Problems("the study's data")
    for need in ["alpaca_plus", "gsm8k"] + [s for s in cfg.mix if s != "demo"]:
        if not (shared / need).is_dir():
            p.add(f"shared_data={cfg.shared_data!r}", f"holds no {need}/", "point --shared_data at ../shared/data")
    p.raise_if_any()
    rng = random.Random(0)
    gsm8k_held_out = _gsm8k(shared)[-GSM8K_HELD_OUT:]
    held_out = {json.dumps(r, sort_keys=True) for r in gsm8k_held_out}
    alpaca = {s: json.loads((shared / "alpaca_plus" / f"validation_{s}.json").read_text()) for s in ("seen", "unseen", "human")}
    eval_instructions = {r["instruction"].strip() for rows in alpaca.values() for r in rows}
    pools = {s: [r for r in SOURCES[s](shared) if json.dumps(r, sort_keys=True) not in held_out
                 and r["instruction"].strip() not in eval_instructions and r.get("output", "").strip()
                 and len(r["instruction"]) + len(r.get("input", "")) + len(r["output"]) <= 1200] for s in cfg.mix}
    n = cfg.scaled(cfg.train_rows) + cfg.val_rows
    rows = []
    for i, s in enumerate(cfg.mix):  # an equal share of each source (the remainder to the last)
        take = n // len(cfg.mix) if i < len(cfg.mix) - 1 else n - len(rows)
        rows += rng.sample(pools[s], min(take, len(pools[s])))
    rng.shuffle(rows)
    data = {"val": rows[: cfg.val_rows], "train": rows[cfg.val_rows:],
            "gsm8k": gsm8k_held_out[: cfg.scaled(cfg.eval_rows)]}
    for s, split in alpaca.items():
        data[f"alpaca_{s}"] = random.Random(1).sample(split, min(cfg.scaled(cfg.eval_rows), len(split)))
    for name, file in files.items():
        file.write_text("".join(json.dumps({k: r[k] for k in ("instruction", "input", "output") if k in r}) + "\n"
                                for r in data[name]))
    return files


# ---- runs -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    """One training run of the study."""

    entry: GridEntry
    stage: str  # "sweep" | "final"
    multiplier: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.entry.name}/{self.stage}-x{self.multiplier:.3g}-s{self.seed}"


def lrs(entry: GridEntry, multiplier: float) -> dict[str, float]:
    """The method's learning rates times the sweep's multiplier (routers and gist rows follow
    the matrices' rate)."""
    return {"lr": (entry.lr or 1e-3) * multiplier, "lr_vectors": (entry.lr_vectors or 1e-2) * multiplier}


def train_settings(cfg: StudyConfig, job: Job, files: dict[str, Path], out: Path) -> dict:
    steps = cfg.scaled(cfg.steps)
    if job.stage == "sweep":
        steps = max(1, round(steps * cfg.sweep_fraction))
    return {"model": cfg.model, "method": job.entry.method, "adapter": dict(job.entry.adapter),
            "data": [str(files["train"])], "val_data": [str(files["val"])], "template": "alpaca",
            "steps": steps, "batch_size": cfg.batch_size, "max_len": cfg.max_len, "warmup_steps": max(1, steps // 10),
            "eval_every": max(1, steps // 4) if job.stage == "final" else 0,  # a sweep needs its last loss only
            "save_every": max(1, steps // 3), "eval_generate": 0,
            "progress": False, "seed": job.seed, "device": cfg.device, "precision": cfg.precision, "out": str(out),
            **lrs(job.entry, job.multiplier)}


def run_child(command: list[str], log: Path) -> int:
    """Run a training process, its output appended to log; its exit code. When the study is
    stopped (Ctrl-C, SIGTERM), the run is stopped with SIGTERM and waited for: it writes its
    checkpoint, and the next invocation resumes it."""
    with log.open("a") as f:
        child = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            return child.wait()
        except KeyboardInterrupt:
            child.send_signal(signal.SIGTERM)
            child.wait()
            raise


def run_job(cfg: StudyConfig, job: Job, files: dict[str, Path], root: Path) -> dict:
    """Train the job (resuming it where it stopped); its summary.json, or {'error': ...}."""
    out = root / "runs" / job.key
    if (out / "summary.json").is_file() and (out / "adapter").is_dir():
        return json.loads((out / "summary.json").read_text())
    settings = train_settings(cfg, job, files, out)
    settings["resume"] = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*"))
    if not settings["resume"] and out.exists():  # a run that died before its first checkpoint
        for stale in ("metrics.jsonl", "summary.json"):
            (out / stale).unlink(missing_ok=True)
    if cfg.in_process:
        try:
            return run_training(train_config(settings))
        except Exception as e:  # noqa: BLE001: a failed run is recorded and the study goes on
            return {"error": f"{type(e).__name__}: {e}"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_train.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}"]
                if cfg.nproc > 1 else [sys.executable])
    command = launcher + ["-m", "slimtune.cli", "train", "--config", str(out / "study_train.yaml")]
    code = run_child(command, out / "train.log")
    if code != 0 or not (out / "summary.json").is_file():
        tail = (out / "train.log").read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit code {code}: {tail[0][:300]}"}
    return json.loads((out / "summary.json").read_text())


def run_sweep_jobs(cfg: StudyConfig, jobs: list[Job], files: dict[str, Path], root: Path) -> dict[str, dict]:
    """Train a method's sweep runs together (train/jobs.py) in one process; each job's summary,
    or {'error': ...}. Finished runs are skipped, interrupted ones resume."""
    settings = []
    for job in jobs:
        out = root / "runs" / job.key
        s = train_settings(cfg, job, files, out)
        s["resume"] = True  # per job: skipped if finished, resumed if it has checkpoints, else started
        settings.append(s)
    names = [f"x{job.multiplier:.3g}".replace(".", "_") for job in jobs]  # adapter names hold no '.'
    error = None
    if cfg.in_process:
        try:
            run_jobs([train_config(s) for s in settings], names, progress=False)
        except (SlimtuneError, RuntimeError) as e:  # a diverged job; the others finished
            error = f"{type(e).__name__}: {e}"
    else:
        where = root / "runs" / jobs[0].entry.name
        where.mkdir(parents=True, exist_ok=True)
        file = where / "sweep_jobs.yaml"
        file.write_text(yaml.safe_dump({"jobs": [{"name": n, **{k: v for k, v in s.items() if k != "resume"}}
                                                 for n, s in zip(names, settings)]}, sort_keys=False))
        command = [sys.executable, "-m", "slimtune.cli", "train", "--jobs", str(file), "--resume", "true",
                   "--progress", "false"]
        code = run_child(command, where / "sweep_jobs.log")
        if code != 0:
            tail = (where / "sweep_jobs.log").read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            error = f"exit code {code}: {tail[0][:300]}"
    out = {}
    for job in jobs:
        summary = root / "runs" / job.key / "summary.json"
        out[job.key] = json.loads(summary.read_text()) if summary.is_file() else {"error": error or "no summary"}
    return out


def val_curve(root: Path, job: Job) -> list[tuple[int, float]]:
    metrics = root / "runs" / job.key / "metrics.jsonl"
    if not metrics.is_file():
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]


def base_val_loss(cfg: StudyConfig, files: dict[str, Path]) -> float:
    """The untrained model's loss on the whole validation slice, as a training run computes it
    at step 0 (recipes/train.py: the same rows, template, batch size and precision)."""
    # a LoRA at its zero init (B = 0) gives the base's outputs exactly
    settings = train_settings(cfg, Job(GridEntry("base", "lora"), "sweep", 1.0, 0), files, Path(cfg.out) / "runs" / "base")
    return float(evaluate_before(train_config({**settings, "steps": 1}))["loss"])


def evaluate_adapter(cfg: StudyConfig, adapter: Path | None, files: dict[str, Path], out: Path,
                     val_loss: float | None) -> dict:
    """The same evaluation for every run: loss on the validation slice (the run's own final
    evaluation, the last point of its curve), ROUGE-L on each Alpaca+ split, exact match on
    held-out GSM8K and on the demo's held-out rows (and judge scores)."""
    device = resolve_device(cfg.device)
    model, tok = load_model(cfg.model).to(device), load_tokenizer(cfg.model)
    if adapter is not None:
        load_adapter(model, adapter, tokenizer=tok)
    scores: dict[str, float] = {"val_loss": val_loss}
    sets = [("gsm8k", files["gsm8k"], ("exact_match",)), ("demo", "demo", ("exact_match",))] + \
        [(f"alpaca_{s}", files[f"alpaca_{s}"], ("rouge_l",)) for s in ("seen", "unseen", "human")]
    rows = cfg.scaled(cfg.eval_rows)
    for name, data, keys in sets:  # one batch per set (up to 64 rows)
        e = EvalConfig(model=cfg.model, data=[str(data)], template="alpaca", limit=rows,
                       max_new_tokens=cfg.max_new_tokens, batch_size=min(rows, 64), device=cfg.device,
                       out=str(out / f"eval_{name}.jsonl"), max_len=cfg.max_len)
        s = run_eval(e, model, tok)
        scores.update({f"{name}_{k}": s[k] for k in keys if k in s})
    if cfg.judge_url:
        e = EvalConfig(model=cfg.model, data=[str(Path(cfg.shared_data) / "vicuna_bench" / "question.jsonl")],
                       template="chat", max_new_tokens=256, device=cfg.device, out=str(out / "eval_vicuna.jsonl"),
                       judge_url=cfg.judge_url, judge_model=cfg.judge_model)
        s = run_eval(e, model, tok)
        scores.update({k: v for k, v in s.items() if k.startswith("judge") and isinstance(v, (int, float))})
    scores["alpaca_rouge_l"] = sum(scores[f"alpaca_{s}_rouge_l"] for s in ("seen", "unseen", "human")) / 3
    return scores


def trainable_parameters(cfg: StudyConfig, entry: GridEntry) -> int:
    """Trainable parameters of the entry on the model, counted on the meta device."""
    if entry.method == "base":
        return 0
    model = build_on_meta(cfg.model)  # a shipped config (smollm2-135m) or a model directory
    add_adapter(model, preset_config(entry.method, dict(entry.adapter)))
    return count_parameters(model).trainable


# ---- the study --------------------------------------------------------------------------------------

# The settings that decide a study's numbers: a record made with others is not resumed. How the
# work is done (device, processes, jobs, paths) may change between invocations.
DECIDING = ("model", "grid", "mix", "train_rows", "val_rows", "steps", "batch_size", "max_len", "sweep_fraction",
            "lr_multipliers", "seeds", "noise_seeds", "eval_rows", "max_new_tokens", "scale", "precision")


def deciding_settings(cfg: StudyConfig) -> dict:
    return json.loads(json.dumps({k: dataclasses.asdict(cfg)[k] for k in DECIDING}))


def check_settings(cfg: StudyConfig, results: "Results") -> None:
    """The record and the runs' directory each hold the settings they were made with (the
    record in a line of its own, `out` in settings.json); resuming either with others would
    mix two studies in one table (or reuse runs and data made for another), so it is refused
    with exit code 2 before anything runs."""
    mine = deciding_settings(cfg)
    record = results.find("config", "settings")
    stored = Path(cfg.out) / "settings.json"
    p = Problems("cannot resume the study")
    for what, theirs, fix in (
            (f"results={str(results.path)!r}", record and record["settings"],
             "give the record's settings to resume it, or --page/--results elsewhere for a new study"),
            (f"out={cfg.out!r}", stored.is_file() and json.loads(stored.read_text()),
             "give its settings to resume it, or --out elsewhere for a new study")):
        if theirs:
            changed = [f"{k} {json.dumps(mine.get(k))} (made with {json.dumps(theirs.get(k))})"
                       for k in DECIDING if mine.get(k) != theirs.get(k)]
            if changed:
                p.add(what, "it was made with other settings: " + "; ".join(changed), fix)
    p.raise_if_any()
    if record is None:
        results.add({"kind": "config", "key": "settings", "settings": mine})
    if not stored.is_file():
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps(mine, indent=1))


class Results:
    """results.jsonl: one JSON object per finished stage, appended as it lands."""

    def __init__(self, path: Path, retry_failed: bool = False):
        self.path = path
        self.records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
            if path.is_file() else []
        if retry_failed and any(r.get("error") for r in self.records):  # forgotten, so that they run again
            self.records = [r for r in self.records if not r.get("error")]
            path.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in self.records))

    def find(self, kind: str, key: str) -> dict | None:
        return next((r for r in self.records if r["kind"] == kind and r["key"] == key), None)

    def add(self, record: dict) -> dict:
        self.records.append(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        return record


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def noise_methods(cfg: StudyConfig, params: dict[str, int]) -> set[str]:
    trained = [g.name for g in cfg.grid if g.method != "base"]
    return set(sorted(trained, key=lambda n: params[n])[: cfg.noise_seeds])


def run_study(cfg: StudyConfig, say=print) -> Path:
    """Run what is not yet done; write the page; return its path."""
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    results = Results(cfg.results_path, cfg.retry_failed)
    check_settings(cfg, results)
    (root / "study.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    files = write_data(cfg, root / "data")
    params = {g.name: trainable_parameters(cfg, g) for g in cfg.grid}
    noisy = noise_methods(cfg, params)
    for entry in cfg.grid:
        if entry.method == "base":
            if not results.find("final", "base"):
                t0 = time.perf_counter()
                scores = evaluate_adapter(cfg, None, files, root / "runs" / "base", base_val_loss(cfg, files))
                results.add({"kind": "final", "key": "base", "name": "base", "seed": 0, "trainable": 0,
                             "scores": scores, "eval_seconds": time.perf_counter() - t0})
            continue
        sweep = []
        todo = [Job(entry, "sweep", m, 0) for m in cfg.lr_multipliers
                if results.find("sweep", Job(entry, "sweep", m, 0).key) is None]
        together = {}
        if cfg.sweep_jobs and len(todo) > 1 and cfg.nproc == 1:
            t0 = time.perf_counter()
            together = run_sweep_jobs(cfg, todo, files, root)
            if not any(s.get("error") for s in together.values()):  # a failed sweep's time says nothing
                results.add({"kind": "sweep_time", "key": entry.name, "name": entry.name, "jobs": len(todo),
                             "seconds": time.perf_counter() - t0})
        for m in cfg.lr_multipliers:
            job = Job(entry, "sweep", m, 0)
            record = results.find("sweep", job.key)
            if record is None:
                s = together[job.key] if job.key in together else run_job(cfg, job, files, root)
                record = results.add({"kind": "sweep", "key": job.key, "name": entry.name, "multiplier": m,
                                      **lrs(entry, m), "val_loss": _finite(s.get("after", {}).get("loss")),
                                      "error": s.get("error")})
                say(f"study: {job.key} val_loss {record['val_loss']}")
            sweep.append(record)
        finite = [r for r in sweep if r["val_loss"] is not None]
        if not finite:
            say(f"study: {entry.name}: every sweep run failed; no final run")
            continue
        best = min(finite, key=lambda r: r["val_loss"])["multiplier"]
        for seed in range(cfg.seeds if entry.name in noisy else 1):
            job = Job(entry, "final", best, seed)
            if results.find("final", job.key):
                continue
            s = run_job(cfg, job, files, root)
            record = {"kind": "final", "key": job.key, "name": entry.name, "seed": seed, "multiplier": best,
                      **lrs(entry, best), "trainable": params[entry.name], "error": s.get("error")}
            if not s.get("error"):
                adapter = root / "runs" / job.key / "adapter"
                t0 = time.perf_counter()
                record.update(steps=s["steps"], train_seconds=s["train_seconds"],
                              seconds_per_step=s.get("step_seconds", s["train_seconds"]) / max(1, s.get("steps_this_process", s["steps"])),
                              peak_memory_bytes=s.get("peak_memory_bytes"),
                              adapter_bytes=sum(f.stat().st_size for f in adapter.iterdir() if f.is_file()),
                              curve=val_curve(root, job),
                              scores=evaluate_adapter(cfg, adapter, files, root / "runs" / job.key,
                                                      _finite(s.get("after", {}).get("loss"))))
                record["eval_seconds"] = time.perf_counter() - t0
            results.add(record)
            say(f"study: {job.key} " + ("failed: " + record["error"] if record["error"] else
                                        f"ROUGE-L {record['scores']['alpaca_rouge_l']:.3f}"))
    return write_page(cfg, results.records, params)


def study_failures(cfg: StudyConfig) -> list[str]:
    """The recorded stages that failed, as 'key: error'."""
    return [f"{r['key']}: {r['error']}" for r in Results(cfg.results_path).records if r.get("error")]


def study_config(data: dict) -> StudyConfig:
    """A StudyConfig from plain data (a YAML file and flags); grid rows are GridEntry mappings."""
    p = Problems("invalid study config")
    data = dict(data)
    grid = data.pop("grid", None)
    cfg = from_dict(StudyConfig, data, p)
    if grid is not None:
        if not isinstance(grid, list) or not grid:
            p.add(f"grid={grid!r}", "expected a list of rows", "write grid: [{name: lora-r8, method: lora}, ...]")
        else:
            cfg.grid = [from_dict(GridEntry, g, p, f"grid[{i}].") for i, g in enumerate(grid)]
            grid_problems(cfg.grid, p)
    p.raise_if_any()
    return cfg
