"""The training loop: accumulation and resume equivalence, checkpoints under a kill, NF4, the CLI."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slimtune
from slimtune import TrainConfig, run_training
from slimtune.cli import build_parser, main
from slimtune.cli.flags import flag_values
from slimtune.configs import merge_overrides
from slimtune.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from slimtune.train.config import train_config
from slimtune.train.loop import Interrupted, lr_factor, setup, train_step


def train_config_from_args(args):
    """What `slimtune train` builds from its flags and --config file (cli/main.py's cmd_train)."""
    from slimtune.cli.flags import read_config_file

    data = merge_overrides(read_config_file(args.config) if args.config else {}, flag_values(args, "cmd"))
    if flag_values(args, "adapter"):
        data["adapter"] = merge_overrides(data.get("adapter") or {}, flag_values(args, "adapter"))
    return train_config(data)


def cfg_for(tiny_dir, out, **kw) -> TrainConfig:
    base = dict(model=tiny_dir, data=["demo"], demo_rows=48, eval_generate=0, max_len=96, progress=False,
                save_every=0, out=str(out), batch_size=8, warmup_steps=0, schedule="constant", steps=3,
                lr=1e-2, lr_vectors=1e-1)
    return TrainConfig(**{**base, **kw})


def adapter_weights(out) -> dict:
    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


def test_grad_accumulation_equivalence(tiny_dir, tmp_path):
    """1x8, 4x2 and 8x1 (micro-batch x accumulation) give the same losses and weights."""
    runs = {}
    for b, a in ((1, 8), (4, 2), (8, 1)):
        out = tmp_path / f"{b}x{a}"
        s = run_training(cfg_for(tiny_dir, out, batch_size=b, grad_accum=a, method="vera",
                                 adapter={"r": 16}))
        runs[(b, a)] = (s["losses"], adapter_weights(out))
    ref_losses, ref_w = runs[(8, 1)]
    for losses, w in runs.values():
        assert losses.keys() == ref_losses.keys()
        for k in losses:
            assert losses[k] == pytest.approx(ref_losses[k], rel=1e-5, abs=1e-6)
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=1e-4, atol=1e-6)


def interrupted_run(cfg: TrainConfig, at: int, monkeypatch) -> None:
    """Run training with a Ctrl-C at step `at` (it writes a checkpoint), then restore the loop."""
    import slimtune.recipes.train as job

    real = job.train_step

    def interrupt(run, step, *a):
        if step == at:
            raise KeyboardInterrupt
        return real(run, step, *a)

    monkeypatch.setattr(job, "train_step", interrupt)
    with pytest.raises(Interrupted, match=f"interrupted at step {at}"):
        run_training(cfg)
    monkeypatch.setattr(job, "train_step", real)


def test_resume_equivalence_after_ctrl_c(tiny_dir, tmp_path, monkeypatch):
    """Stop at step 3 (Ctrl-C writes a checkpoint), resume: every later loss and the final weights match."""
    kw = dict(steps=7, grad_accum=2, batch_size=4, adapter={"dropout": 0.1}, save_every=2, schedule="cosine", log_every=1,
              warmup_steps=2)
    full = run_training(cfg_for(tiny_dir, tmp_path / "full", **kw))
    interrupted_run(cfg_for(tiny_dir, tmp_path / "cut", **kw), 3, monkeypatch)
    assert latest_checkpoint(tmp_path / "cut").name == "step-000003"
    resumed = run_training(cfg_for(tiny_dir, tmp_path / "cut", resume=True, **kw))
    assert sorted(resumed["losses"]) == [4, 5, 6, 7]
    assert (resumed["steps"], resumed["steps_this_process"], full["steps_this_process"]) == (7, 4, 7)  # time per step
    assert 0 < resumed["step_seconds"] < resumed["train_seconds"]
    for k, v in resumed["losses"].items():
        assert v == full["losses"][k]
    a, b = adapter_weights(tmp_path / "full"), adapter_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 8))  # no duplicated steps after resume
    assert (tmp_path / "cut" / "loss.png").stat().st_size > 1000


def test_resume_refuses_a_different_window(tiny_dir, tmp_path):
    run_training(cfg_for(tiny_dir, tmp_path, steps=2, save_every=1))
    with pytest.raises(slimtune.SlimtuneError, match="window of 4 examples"):
        run_training(cfg_for(tiny_dir, tmp_path, steps=4, batch_size=4, resume=True))


def test_failed_checkpoint_write_keeps_the_previous_one(tiny_dir, tmp_path, monkeypatch):
    run = setup(cfg_for(tiny_dir, tmp_path))
    train_step(run, 0)
    save_checkpoint(tmp_path, 1, run.model, run.opt, {"window": 8})
    import slimtune.train.checkpoint as ck

    def broken(tensors, path, *a, **k):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", broken)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, run.model, run.opt, {"window": 8})
    assert latest_checkpoint(tmp_path).name == "step-000001"
    assert load_checkpoint(latest_checkpoint(tmp_path), run.model, run.opt)["step"] == 1


KILL_WORKER = r"""
import sys, torch, slimtune
from slimtune import TrainConfig
from slimtune.train.loop import setup, train_step
from slimtune.train.checkpoint import save_checkpoint
cfg = TrainConfig(model=sys.argv[1], data=["demo"], demo_rows=16, eval_generate=0, progress=False, out=sys.argv[2],
                  adapter={"r": 64}, steps=1)
run = setup(cfg)
train_step(run, 0)
step = int(sys.argv[3])
print("ready", flush=True)
while True:
    step += 1
    save_checkpoint(sys.argv[2], step, run.model, run.opt, {"window": 8}, keep=2)
"""


def test_sigkill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tiny_dir, tmp_path):
    out = tmp_path / "run"
    run = setup(cfg_for(tiny_dir, tmp_path / "reader", adapter={"r": 64}, batch_size=8))
    last = 0
    for delay in (0.05, 0.13, 0.21, 0.34, 0.55):
        p = subprocess.Popen([sys.executable, "-c", KILL_WORKER, tiny_dir, str(out), str(last * 1000)],
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        ckpt = latest_checkpoint(out)
        assert ckpt is not None
        state = load_checkpoint(ckpt, run.model, run.opt)  # loads completely: adapter, optimiser, RNG
        assert state["step"] == int(ckpt.name.split("-")[1])
        last += 1


def test_lr_schedules():
    cfg = TrainConfig(warmup_steps=4, schedule="cosine")
    assert [lr_factor(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(9, cfg, 14) == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor(14, cfg, 14) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(9, dataclasses.replace(cfg, schedule="constant"), 14) == 1.0


def test_vectors_get_their_own_learning_rate(tiny_dir, tmp_path):
    run = setup(cfg_for(tiny_dir, tmp_path, method="vera", adapter={"r": 16}, lr=0.5, lr_vectors=0.25))
    groups = run.opt.param_groups
    assert len(groups) == 1 and groups[0]["lr"] == 0.25 and all(p.ndim == 1 for p in groups[0]["params"])
    run = setup(cfg_for(tiny_dir, tmp_path, method="tied-lora", lr=0.5, lr_vectors=0.25))
    assert sorted(g["lr"] for g in run.opt.param_groups) == [0.25, 0.5]


def test_fused_adamw_takes_the_same_steps_as_foreach(tiny_dir, tmp_path):
    cfg = cfg_for(tiny_dir, tmp_path, method="tied-lora", weight_decay=0.1)  # both groups, with decay
    fused, ref = setup(cfg), setup(cfg)
    assert all(g["fused"] for g in fused.opt.param_groups)
    ref.opt = torch.optim.AdamW([{**{k: v for k, v in g.items() if k != "fused"}, "foreach": True}
                                 for g in ref.opt.param_groups])
    for step in range(3):
        train_step(fused, step)
        train_step(ref, step)
    assert any((p - p0).abs().max() > 1e-3 for p, p0 in zip(ref.params, setup(cfg).params))  # it trained
    for p, q in zip(fused.params, ref.params):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode,cls,dtype", [("nf4", "Linear4bit", torch.uint8), ("int8", "Linear8bitLt", torch.int8)])
def test_quantised_base_trains_on_cpu(tiny_dir, tmp_path, mode, cls, dtype):
    pytest.importorskip("bitsandbytes")
    run = setup(cfg_for(tiny_dir, tmp_path, quantize=mode, steps=4))
    layer = dict(slimtune.adapters.sites(run.model))["model.layers.0.self_attn.q_proj"]
    host = run.model.model.layers[0].self_attn.q_proj
    assert type(host.base).__name__ == cls and host.base.weight.dtype == dtype
    packed = host.base.weight.detach().clone()
    losses = [train_step(run, s).loss for s in range(4)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert torch.equal(host.base.weight, packed)  # the base stays frozen
    assert layer.B.abs().sum() > 0  # the adapter (full precision) trained
    with pytest.raises(slimtune.SlimtuneError, match="quantised"):
        slimtune.merge_adapters(run.model)


def test_cli_yaml_and_flags_give_the_same_config(tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text("method: vera\nlr_vectors: 0.01\nadapter:\n  r: 64\n  d:\n    init: 0.2\nsteps: 5\n")
    a = train_config_from_args(build_parser().parse_args(["train", "--config", str(y)]))
    b = train_config_from_args(build_parser().parse_args(
        ["train", "--method", "vera", "--lr_vectors", "0.01", "--rank", "64", "--adapter.d.init", "0.2", "--steps", "5"]))
    assert a == b and a.adapter.r == 64 and a.adapter.d.init == 0.2 and a.adapter.preset == "vera"
    y.write_text("lrr: 1\nadapter:\n  rr: 3\n")
    with pytest.raises(slimtune.SlimtuneError) as e:
        train_config_from_args(build_parser().parse_args(["train", "--config", str(y)]))
    assert "'lrr'" in str(e.value) and "'rr'" in str(e.value)


def test_cli_end_to_end(tiny_dir, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    from slimtune.data.demo import demo_rows

    rows.write_text("".join(json.dumps(r) + "\n" for r in demo_rows(40)))
    out = tmp_path / "run"
    assert main(["train", "--model", tiny_dir, "--data", str(rows), "--val_fraction", "0.2", "--steps", "3",
                 "--batch_size", "4", "--eval_generate", "4", "--max_new_tokens", "4", "--out", str(out),
                 "--progress", "false"]) == 0
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed and "exact_match" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"]["n_generated"] == 4 and summary["steps"] == 3
    ev = tmp_path / "eval.jsonl"
    assert main(["eval", "--model", tiny_dir, "--adapter", str(out / "adapter"), "--data", str(rows), "--limit", "5",
                 "--max_new_tokens", "4", "--out", str(ev)]) == 0
    lines = [json.loads(x) for x in ev.read_text().splitlines()]
    assert len(lines) == 5 and {"prediction", "reference", "exact_match", "rouge_l"} <= set(lines[0])
    assert main(["generate", "--model", tiny_dir, "--adapter", str(out / "adapter"), "--prompt", "Add 1 and 2",
                 "--max_new_tokens", "3", "--jsonl"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompt"] == "Add 1 and 2"
    assert main(["train", "--model", tiny_dir, "--data", str(tmp_path / "missing.jsonl"), "--out",
                 str(tmp_path / "run2")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_grad_checkpointing_gives_the_same_step(tiny_dir, tmp_path):
    a, b = (setup(cfg_for(tiny_dir, tmp_path, grad_checkpointing=gc)) for gc in (False, True))
    assert getattr(b.model, "is_activation_checkpointing", None) or b.model.is_gradient_checkpointing
    for step in range(2):
        sa, sb = train_step(a, step), train_step(b, step)
        assert sa.loss == pytest.approx(sb.loss, rel=1e-6) and sa.tokens == sb.tokens
    for pa, pb in zip(a.params, b.params):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_trains_close_to_fp32(tiny_dir, tmp_path):
    """bf16 autocast with fp32 adapters, on an adapter trained away from its identity init: the
    fp32 run's adapter after four steps, copied into the bf16 run, gives the same loss and
    gradients there within bf16's precision (an 8-bit mantissa: a few % in norm)."""
    from slimtune.train.loop import micro_batches

    a, b = (setup(cfg_for(tiny_dir, tmp_path, precision=p, method="tied-lora")) for p in ("fp32", "bf16"))
    assert b.bf16 and not a.bf16 and all(p.dtype == torch.float32 for p in b.params)  # adapters stay fp32
    start = [p.detach().clone() for p in a.params]
    for step in range(4):
        train_step(a, step)
    assert sum((p - p0).norm() for p, p0 in zip(a.params, start)) > 1e-1  # it trained
    with torch.no_grad():
        for pa, pb in zip(a.params, b.params):
            pb.copy_(pa)
    grads, losses = [], []
    for run in (a, b):
        (batch,) = micro_batches(run, 4)
        with run.autocast():
            s, n = run.loss_model(**batch)
        (s / n).backward()
        losses.append(float(s / n))
        grads.append([p.grad.detach().clone() for p in run.params])
        run.opt.zero_grad()
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    for ga, gb in zip(*grads):
        assert gb.dtype == torch.float32 and (gb - ga).norm() < 5e-2 * ga.norm() + 1e-6


def test_sigterm_stops_a_background_run_with_a_checkpoint_that_resumes(tiny_dir, tmp_path):
    """A run started in the background by a shell without job control ignores SIGINT; SIGTERM
    stops it as Ctrl-C would: a checkpoint, exit code 130, and --resume goes on from it."""
    out = tmp_path / "run"
    flags = ["--model", tiny_dir, "--data", "demo", "--demo_rows", "32", "--batch_size", "2", "--max_len", "64",
             "--eval_generate", "0", "--progress", "false", "--log_every", "1", "--save_every", "0", "--out", str(out)]
    p = subprocess.Popen([sys.executable, "-m", "slimtune.cli", "train", "--steps", "100000", *flags],
                         stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and '"loss"' in metrics.read_text()) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130, err
    assert "checkpoint written" in err and "Traceback" not in err
    step = int(latest_checkpoint(out).name.split("-")[1])
    assert step >= 1
    done = subprocess.run([sys.executable, "-m", "slimtune.cli", "train", "--steps", str(step + 1), "--resume", "true",
                           *flags], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == step + 1 and summary["steps_this_process"] == 1  # it went on from the checkpoint
