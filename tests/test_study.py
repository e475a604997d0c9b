"""`slimtune study` end to end on a tiny model: a 2-method grid is swept, trained, evaluated and
written up (table, Pareto plot, curves); a second invocation trains and evaluates nothing and
writes the page again."""

from __future__ import annotations

import json

import pytest
import yaml

from slimtune.cli import main
from slimtune.recipes import study
from slimtune.recipes.study import SHARED
from slimtune.recipes.study_report import BEGIN

pytestmark = pytest.mark.skipif(not (SHARED / "alpaca_plus").is_dir(), reason="needs ../shared/data")


def grid_file(tmp_path, tiny_dir, **extra):
    config = {"model": tiny_dir, "grid": [{"name": "lora-r8", "method": "lora", "adapter": {"r": 2}},
                                          {"name": "ia3", "method": "ia3"}],
              "mix": ["demo", "gsm8k"], "train_rows": 40, "val_rows": 4, "steps": 2, "batch_size": 2, "max_len": 64,
              "sweep_fraction": 0.5, "lr_multipliers": [1.0, 3.0], "seeds": 2, "noise_seeds": 1, "eval_rows": 2,
              "max_new_tokens": 4, "device": "cpu", "in_process": True, "out": str(tmp_path / "study"),
              "page": str(tmp_path / "docs" / "study.md"), **extra}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_two_method_study_end_to_end_and_a_second_run_only_rewrites_the_page(tiny_dir, tmp_path, monkeypatch, capsys):
    config = grid_file(tmp_path, tiny_dir)
    assert main(["study", str(config)]) == 0
    records = [json.loads(line) for line in (tmp_path / "docs" / "study.jsonl").read_text().splitlines()]
    sweeps = [r for r in records if r["kind"] == "sweep"]
    finals = [r for r in records if r["kind"] == "final"]
    assert len(sweeps) == 4 and all(r["val_loss"] is not None for r in sweeps)
    # the cheapest method (ia3 here) runs 2 seeds, the other one
    assert sorted((r["name"], r["seed"]) for r in finals) == [("ia3", 0), ("ia3", 1), ("lora-r8", 0)]
    for r in finals:  # the winner of each sweep is the multiplier with the lowest validation loss
        mine = [s for s in sweeps if s["name"] == r["name"]]
        assert r["multiplier"] == min(mine, key=lambda s: s["val_loss"])["multiplier"]
        assert set(r["scores"]) >= {"val_loss", "alpaca_rouge_l", "gsm8k_exact_match", "demo_exact_match"}
        assert r["adapter_bytes"] > 0 and r["peak_memory_bytes"] > 0 and r["curve"]
        # the held-out loss is the run's own final evaluation on the validation slice: its curve's end
        assert r["curve"][-1] == [2, pytest.approx(r["scores"]["val_loss"])]
    # each method's two sweep runs trained together, as jobs over one base, and the page says what it saved
    assert sorted(r["name"] for r in records if r["kind"] == "sweep_time") == ["ia3", "lora-r8"]
    for r in sweeps:
        assert json.loads((tmp_path / "study" / "runs" / r["key"] / "summary.json").read_text())["jobs_run"]
    page = (tmp_path / "docs" / "study.md").read_text()
    assert "| lora-r8 |" in page and "| ia3 |" in page and "lr ×3" in page
    assert "The sweeps of 2 methods trained as jobs" in page
    # the page's command reproduces this study: the settings that differ from the defaults
    assert f"`slimtune study --out {tmp_path / 'study'} --model {tiny_dir} " in page and " --steps 2 " in page
    assert "--in_process" not in page and "grid and lists of" in page
    assert (tmp_path / "docs" / "img" / "study_pareto.png").stat().st_size > 1000
    assert (tmp_path / "docs" / "img" / "study_val_loss.png").stat().st_size > 1000
    # hand-written notes outside the generated block survive; a second invocation runs nothing
    (tmp_path / "docs" / "study.md").write_text(page + "\n## Why\n\nhand-written\n")

    def refuse(*args, **kwargs):
        raise AssertionError("a finished study trained or evaluated again")

    monkeypatch.setattr(study, "run_job", refuse)
    monkeypatch.setattr(study, "run_sweep_jobs", refuse)
    monkeypatch.setattr(study, "evaluate_adapter", refuse)
    assert main(["study", str(config)]) == 0
    again = (tmp_path / "docs" / "study.md").read_text()
    assert "hand-written" in again and again.count(BEGIN) == 1 and again.replace("\n## Why\n\nhand-written\n", "") == page
    assert len((tmp_path / "docs" / "study.jsonl").read_text().splitlines()) == len(records)


def test_failed_stages_are_recorded_said_and_run_again_only_when_asked(tiny_dir, tmp_path, monkeypatch, capsys):
    config = grid_file(tmp_path, tiny_dir, grid=[{"name": "lora-r8", "method": "lora", "adapter": {"r": 2}}])
    real = study.run_sweep_jobs
    monkeypatch.setattr(study, "run_sweep_jobs", lambda cfg, jobs, *a: {j.key: {"error": "KeyError: boom"} for j in jobs})
    assert main(["study", str(config)]) == 1
    assert "2 stages failed" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "docs" / "study.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["config", "sweep", "sweep"]  # no final, and a failed sweep's time is not kept
    assert main(["study", str(config)]) == 1  # a failure is a result: not rerun unasked
    monkeypatch.setattr(study, "run_sweep_jobs", real)
    assert main(["study", str(config), "--retry_failed", "true"]) == 0
    records = [json.loads(line) for line in (tmp_path / "docs" / "study.jsonl").read_text().splitlines()]
    assert sorted(r["kind"] for r in records) == ["config", "final", "final", "sweep", "sweep", "sweep_time"]  # 2 seeds
    assert not any(r.get("error") for r in records)


def test_a_run_in_its_own_process_records_its_peak_memory(tiny_dir, tmp_path):
    cfg = study.study_config(yaml.safe_load(grid_file(tmp_path, tiny_dir, in_process=False,
                                                      precision="bf16").read_text()))
    files = study.write_data(cfg, tmp_path / "study" / "data")
    job = study.Job(cfg.grid[0], "final", 1.0, 0)
    assert study.train_settings(cfg, job, files, tmp_path)["precision"] == "bf16"  # the study's precision, each run's
    summary = study.run_job(cfg, job, files, tmp_path / "study")
    assert "error" not in summary, summary
    assert summary["steps"] == 2 and summary["peak_memory_bytes"] > 50 * 2**20
    assert (tmp_path / "study" / "runs" / job.key / "adapter").is_dir()


def test_a_sweep_as_jobs_in_a_process_of_its_own(tiny_dir, tmp_path):
    cfg = study.study_config(yaml.safe_load(grid_file(tmp_path, tiny_dir, in_process=False).read_text()))
    files = study.write_data(cfg, tmp_path / "study" / "data")
    jobs = [study.Job(cfg.grid[0], "sweep", m, 0) for m in (1 / 3, 3.0)]  # the default's 0.333: no '.' in a name
    out = study.run_sweep_jobs(cfg, jobs, files, tmp_path / "study")
    assert all("error" not in s and s["jobs_run"] for s in out.values()), out
    assert (tmp_path / "study" / "runs" / cfg.grid[0].name / "sweep_jobs.yaml").is_file()


def test_a_bad_grid_is_refused_with_every_problem(tmp_path, tiny_dir, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"grid": [{"name": "a", "method": "lorra"}, {"name": "a", "method": "lora",
                                                                                   "lr": -1}], "scale": 0, "precision": "fp8"}))
    assert main(["study", str(config)]) == 2
    err = capsys.readouterr().err
    assert "lorra" in err and "share a name" in err and "lr=-1" in err and "scale=0" in err and "fp8" in err


def test_a_record_or_runs_made_with_other_settings_are_not_resumed(tiny_dir, tmp_path, monkeypatch, capsys):
    config = grid_file(tmp_path, tiny_dir)
    cfg = study.study_config(yaml.safe_load(config.read_text()))
    other = study.deciding_settings(study.study_config({**yaml.safe_load(config.read_text()), "steps": 3}))

    def refuse(*args, **kwargs):
        raise AssertionError("a study with other settings ran")

    for name in ("run_job", "run_sweep_jobs", "evaluate_adapter", "write_data"):
        monkeypatch.setattr(study, name, refuse)
    record = tmp_path / "docs" / "study.jsonl"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"kind": "config", "key": "settings", "settings": other}) + "\n")
    assert main(["study", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"results='{record}'" in err and "steps 2 (made with 3)" in err and "Traceback" not in err
    assert record.read_text().count("\n") == 1  # nothing added
    record.unlink()  # a new record, over runs made with steps 3
    (tmp_path / "study").mkdir(exist_ok=True)
    (tmp_path / "study" / "settings.json").write_text(json.dumps(other))
    assert main(["study", str(config)]) == 2
    assert f"out='{cfg.out}'" in capsys.readouterr().err and not record.exists()


def test_a_claims_verdict_reads_both_measures_against_the_noise():
    from slimtune.recipes.study_report import verdict

    def row(rouge, loss, sd=None):
        return {"alpaca_rouge_l": (rouge, sd), "val_loss": (loss, sd)}

    level = {"a": row(0.270, 1.50, 0.01), "b": row(0.280, 1.49)}  # both within twice the spread
    assert verdict(level, "a", "b", "level").startswith("confirmed")
    assert verdict(level, "a", "b", "above").startswith("not at this scale")
    split = {"a": row(0.270, 1.60, 0.01), "b": row(0.280, 1.49)}  # ROUGE-L level, loss 0.11 worse
    assert verdict(split, "a", "b", "level").startswith("on ROUGE-L only")
    assert "held-out loss: a worse than b" in verdict(split, "a", "b", "level")
    above = {"a": row(0.330, 1.40), "b": row(0.280, 1.49)}  # no spread: one point of margin
    assert verdict(above, "a", "b", "above").startswith("confirmed") and "ROUGE-L: a better than b" in verdict(above, "a", "b", "above")
    assert verdict(above, "b", "a", "above").startswith("not at this scale")
    assert verdict({"a": row(0.330, 1.60), "b": row(0.280, 1.49)}, "a", "b", "above").startswith("on ROUGE-L only")


def test_the_cost_columns_say_how_far_seeds_drift():
    from slimtune.recipes.study_report import drift

    def final(name, step, peak):
        return {"kind": "final", "name": name, "seconds_per_step": step, "peak_memory_bytes": peak}

    records = [final("a", 2.0, 100), final("a", 3.0, 110), final("b", 1.0, 50)]  # b: one seed, no spread
    assert "step time by up to 50 %" in drift(records) and "peak memory by up to 10 %" in drift(records)
    assert drift([final("b", 1.0, 50)]) == ""
