"""Many training jobs over one base in one batch (`slimtune train --jobs`): each job's adapter is
the one it gets trained alone by `slimtune train`, for every method, mixed in one batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import slimtune
from slimtune import TrainConfig, run_training
from slimtune.adapters.helpers import trainable_parameters
from slimtune.cli import main
from slimtune.errors import SlimtuneError
from slimtune.recipes import jobs as jobs_recipe
from slimtune.recipes.jobs import run_jobs
from slimtune.train.jobs import jobs_step, setup_jobs
from slimtune.train.loop import Interrupted, NonFinite, micro_batches

from conftest import METHODS

TOL = 2e-5  # float reordering of a mixed batch (padding to the longest row, gathered products)


def cfg_for(tiny_dir, out, **kw) -> TrainConfig:
    base = dict(model=tiny_dir, data=["demo"], demo_rows=48, eval_generate=0, max_len=96, progress=False,
                save_every=0, out=str(out), batch_size=4, warmup_steps=0, schedule="constant", steps=3,
                lr=1e-2, lr_vectors=1e-1)
    if kw.get("method") == "vera":
        base["adapter"] = {"r": 16}
    return TrainConfig(**{**base, **kw})


def saved(tiny_dir, out) -> dict[str, torch.Tensor]:
    """The trained tensors of the adapter saved in out/adapter, read back onto a fresh base."""
    model = slimtune.load_model(tiny_dir)
    slimtune.load_adapter(model, Path(out) / "adapter")
    return {k: v.detach().clone() for k, v in trainable_parameters(model).items()}


def initial(tiny_dir, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    model = slimtune.load_model(tiny_dir)
    torch.manual_seed(cfg.seed)
    slimtune.add_adapter(model, cfg.adapter)
    return {k: v.detach().clone() for k, v in trainable_parameters(model).items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_every_method_in_one_mixed_batch_matches_its_run_alone(tiny_dir, tmp_path):
    """One jobs run holding every method (each its own seed): every job's adapter equals the
    adapter `slimtune train` gives that job alone, and moved far from its init."""
    solo = {m: cfg_for(tiny_dir, tmp_path / "solo" / m, method=m, seed=i) for i, m in enumerate(METHODS)}
    for cfg in solo.values():
        run_training(cfg)
    cfgs = [cfg_for(tiny_dir, tmp_path / "jobs" / m, method=m, seed=i) for i, m in enumerate(METHODS)]
    report = run_jobs(cfgs, list(METHODS), progress=False)
    assert report.finished == list(METHODS)
    for m, cfg in zip(METHODS, cfgs):
        alone, together = saved(tiny_dir, solo[m].out), saved(tiny_dir, cfg.out)
        assert max_diff(alone, together) < TOL, m
        assert max_diff(alone, initial(tiny_dir, cfg)) > 100 * TOL, m  # trained: the check is not vacuous


def test_jobs_of_one_method_keep_their_own_settings(tiny_dir, tmp_path):
    """Learning rate, schedule, batch size, accumulation, data, seed and steps are each job's own."""
    kinds = [dict(lr=3e-2, seed=1), dict(lr=1e-3, schedule="cosine", warmup_steps=2, steps=5, seed=2),
             dict(batch_size=2, grad_accum=3, demo_rows=40, seed=3), dict(method="vera", steps=2, seed=4)]
    cfgs = [cfg_for(tiny_dir, tmp_path / f"jobs{i}", **kw) for i, kw in enumerate(kinds)]
    run_jobs(cfgs, progress=False)
    for i, (kw, cfg) in enumerate(zip(kinds, cfgs)):
        alone = cfg_for(tiny_dir, tmp_path / f"solo{i}", **kw)
        run_training(alone)
        assert max_diff(saved(tiny_dir, alone.out), saved(tiny_dir, cfg.out)) < TOL, kw


def test_the_loss_of_each_job_is_its_own(tiny_dir):
    """One step by hand: each job's loss equals its own forward alone, its adapter active."""
    cfgs = [cfg_for(tiny_dir, f"unused{i}", method=m, seed=i) for i, m in enumerate(("lora", "mov", "ia3"))]
    jobs = setup_jobs(cfgs)
    model = jobs[0].run.model
    expected = {}
    for job in jobs:  # alone: the job's adapter active, its own micro-batch, its own loss
        slimtune.set_active_adapter(model, job.name)
        with torch.no_grad():
            s, n = job.run.loss_model(**micro_batches(job.run, job.step)[0])
        expected[job.name] = float(s / n)
    results = jobs_step(jobs)
    for job in jobs:
        assert results[job.name].loss == pytest.approx(expected[job.name], rel=1e-5)


def test_a_diverging_job_stops_alone(tiny_dir, tmp_path):
    """A job whose learning rate blows it up stops before its bad update; the others finish and
    equal their runs alone; the command then fails naming the job."""
    cfgs = [cfg_for(tiny_dir, tmp_path / "a", seed=1, steps=4),
            cfg_for(tiny_dir, tmp_path / "boom", seed=2, steps=4, lr=1e30, max_grad_norm=0.0),
            cfg_for(tiny_dir, tmp_path / "b", method="ia3", seed=3, steps=4)]
    with pytest.raises(SlimtuneError, match="job boom: step [0-9]+: (loss|gradient norm)"):
        run_jobs(cfgs, ["a", "boom", "b"], progress=False)
    assert not (tmp_path / "boom" / "adapter").exists()
    for name, cfg in (("a", cfgs[0]), ("b", cfgs[2])):
        alone = TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / f"solo-{name}")})
        run_training(alone)
        assert max_diff(saved(tiny_dir, alone.out), saved(tiny_dir, cfg.out)) < TOL


def test_a_non_finite_job_is_not_updated(tiny_dir):
    cfgs = [cfg_for(tiny_dir, "x", seed=1), cfg_for(tiny_dir, "y", seed=2)]
    jobs = setup_jobs(cfgs, ["x", "y"])
    with torch.no_grad():
        next(iter(jobs[1].run.params)).fill_(float("nan"))
    before = {k: v.clone() for k, v in trainable_parameters(jobs[1].run.model, "y").items()}
    results = jobs_step(jobs)
    assert isinstance(results["y"], NonFinite) and not jobs[1].running and jobs[1].step == 0
    after = trainable_parameters(jobs[1].run.model, "y")
    assert all(torch.equal(before[k], after[k]) for k in before if torch.isfinite(before[k]).all())
    assert jobs[0].step == 1 and set(jobs_step(jobs)) == {"x"}


def test_jobs_resume_each_from_its_own_checkpoint(tiny_dir, tmp_path, monkeypatch):
    """Interrupted mid-run, then resumed: the same adapters as an uninterrupted run; a third
    invocation finds every job finished and trains nothing."""
    def cfgs(root, **kw):
        return [cfg_for(tiny_dir, root / "a", steps=4, save_every=1, seed=1, **kw),
                cfg_for(tiny_dir, root / "b", method="mov", steps=6, save_every=1, seed=2, **kw)]
    run_jobs(cfgs(tmp_path / "whole"), ["a", "b"], progress=False)
    calls = {"n": 0}
    real_step = jobs_recipe.jobs_step

    def interrupted(jobs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(jobs)
    monkeypatch.setattr(jobs_recipe, "jobs_step", interrupted)
    with pytest.raises(Interrupted):
        run_jobs(cfgs(tmp_path / "cut"), ["a", "b"], progress=False)
    monkeypatch.setattr(jobs_recipe, "jobs_step", real_step)
    assert not (tmp_path / "cut" / "a" / "adapter").exists()
    report = run_jobs(cfgs(tmp_path / "cut", resume=True), ["a", "b"], progress=False)
    assert report.finished == ["a", "b"]
    for name in ("a", "b"):
        assert max_diff(saved(tiny_dir, tmp_path / "whole" / name), saved(tiny_dir, tmp_path / "cut" / name)) < TOL
    again = run_jobs(cfgs(tmp_path / "cut", resume=True), ["a", "b"], progress=False)
    assert again.skipped == ["a", "b"] and not again.finished


def test_cli_trains_a_jobs_file(tiny_dir, tmp_path, capsys):
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(yaml.safe_dump({"steps": 2, "jobs": [{"name": "lo", "method": "lora", "lr": 1e-2},
                                                         {"name": "ve", "method": "vera", "adapter": {"r": 16}},
                                                         {"method": "ia3", "out": str(tmp_path / "ia3")}]}))
    rc = main(["train", "--jobs", str(jobs), "--model", tiny_dir, "--demo_rows", "32", "--eval_generate", "0",
               "--max_len", "96", "--batch_size", "4", "--progress", "false", "--out", str(tmp_path / "runs")])
    assert rc == 0
    for out in (tmp_path / "runs" / "lo", tmp_path / "runs" / "ve", tmp_path / "ia3"):
        assert (out / "adapter" / "adapter_config.json").is_file() and (out / "summary.json").is_file()
    assert "peft_type" in (tmp_path / "runs" / "lo" / "adapter" / "adapter_config.json").read_text()


@pytest.mark.parametrize("jobs, expected", [
    ({"jobs": [{"method": "lora"}, {"method": "lora", "lrr": 1}]}, "jobs[1] (job1): key 'lrr'"),
    ({"jobs": [{"method": "lora"}, {"method": "lora", "model": "other"}]}, "jobs[1].model='other'"),
    ({"jobs": [{"name": "a"}, {"name": "a"}]}, "jobs[1].name='a'"),
    ({"jobs": [{"name": "lr0.5"}]}, "jobs[0].name='lr0.5'"),  # an adapter name keys torch modules: no '.'

    ({"jobs": [{"out": "same"}, {"out": "same"}]}, "jobs[1].out='same'"),
    ({"jobs": [{"gist": 1}]}, "jobs[0].gist=1"),
    ({"jobs": []}, "no non-empty list under `jobs:`"),
    ({"job": [{"method": "lora"}]}, "no non-empty list under `jobs:`"),
])
def test_bad_jobs_files_are_refused_before_loading(tiny_dir, tmp_path, capsys, jobs, expected):
    f = tmp_path / "jobs.yaml"
    f.write_text(yaml.safe_dump(jobs))
    rc = main(["train", "--jobs", str(f), "--model", tiny_dir, "--progress", "false", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
