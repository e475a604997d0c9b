"""Two-process CPU DistributedDataParallel (gloo) through the same entry point as one process."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import slimtune
from test_train import cfg_for


def test_two_process_ddp_matches_one_process(tiny_dir, tmp_path):
    cfg = cfg_for(tiny_dir, tmp_path / "ddp", steps=4, batch_size=4, method="tied-lora", schedule="cosine",
                  warmup_steps=1)
    out = tmp_path / "ranks"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(Path(__file__).parent / "ddp_worker.py"), json.dumps(dataclasses.asdict(cfg)), str(out)],
                       capture_output=True, text=True, env=env, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["threads"] == 1
    w0, w1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # identical trainable weights on both ranks
    assert (tmp_path / "ddp" / "adapter").is_dir() and not (tmp_path / "ddp" / "rank1").exists()

    model = slimtune.load_model(tiny_dir)
    single = slimtune.run_training(dataclasses.replace(cfg, batch_size=8, out=str(tmp_path / "one")), model=model,
                                   tokenizer=slimtune.load_tokenizer(tiny_dir))
    for step, loss in single["losses"].items():  # the same global batch of 8 each step
        assert r0["losses"][str(step)] == pytest.approx(loss, rel=1e-4)
    one = slimtune.trainable_parameters(model)
    for k in w0:
        torch.testing.assert_close(w0[k], one[k].detach(), rtol=1e-3, atol=1e-5)


def torchrun(cfg, out: Path):
    out.mkdir(exist_ok=True)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(Path(__file__).parent / "ddp_worker.py"), json.dumps(dataclasses.asdict(cfg)), str(out)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)], \
        [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]


def test_fsdp2_matches_one_process_and_resumes(tiny_dir, tmp_path):
    """FSDP2 (fully_shard on every block, gloo): the losses and weights of one process at the
    same global batch; a resumed sharded run continues the same curve."""
    cfg = cfg_for(tiny_dir, tmp_path / "fsdp", steps=4, batch_size=4, method="lora", parallel="fsdp",
                  save_every=2, eval_every=2)
    (r0, r1), (w0, w1) = torchrun(cfg, tmp_path / "a")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    (q0, _), (v0, _) = torchrun(dataclasses.replace(cfg, steps=6, resume=True), tmp_path / "b")
    assert sorted(map(int, q0["losses"])) == [5, 6]

    model = slimtune.load_model(tiny_dir)
    single = slimtune.run_training(dataclasses.replace(cfg, steps=6, batch_size=8, parallel="ddp",
                                                       out=str(tmp_path / "one")),
                                   model=model, tokenizer=slimtune.load_tokenizer(tiny_dir))
    curve = {**r0["losses"], **q0["losses"]}
    for step, loss in single["losses"].items():
        assert curve[str(step)] == pytest.approx(loss, rel=1e-4), step
    one = slimtune.trainable_parameters(model)
    for k in v0:
        torch.testing.assert_close(v0[k], one[k].detach(), rtol=1e-3, atol=1e-5)
    from slimtune.formats.adapter import read_adapter

    _, saved, _ = read_adapter(tmp_path / "fsdp" / "adapter", slimtune.load_model(tiny_dir))
    assert all(torch.equal(saved[k], v0[k]) for k in saved)  # rank 0 wrote the gathered adapter
