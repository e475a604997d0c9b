"""The faults found by trying slimtune as a new user would, one test each: every bad input is one
clear line and exit code 2 (Ctrl-C: 130), nothing is lost, and state is all or nothing."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

import slimtune
from slimtune.cli import main
from slimtune.data.demo import demo_rows

TRAIN = ["train", "--steps", "2", "--batch_size", "4", "--demo_rows", "24", "--eval_generate", "0",
         "--progress", "false", "--max_len", "96"]


def train(tiny_dir, out, *extra) -> int:
    return main(TRAIN + ["--model", tiny_dir, "--out", str(out), *extra])


def rows_file(tmp_path, n=24, name="rows.jsonl", prefix=b"") -> Path:
    path = tmp_path / name
    path.write_bytes(prefix + "".join(json.dumps(r) + "\n" for r in demo_rows(n)).encode())
    return path


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# Training that goes wrong exits 0 --------------------------------------------------------------

def test_a_diverging_run_stops_at_the_step_and_keeps_its_checkpoints(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_dir, out, "--lr", "1e30", "--steps", "4", "--save_every", "1", "--warmup_steps", "0",
                 "--max_grad_norm", "0") == 2
    err = error_of(capsys)
    assert "step 2: " in err and "training diverged" in err and "lower the learning rate" in err
    assert not (out / "adapter").exists()  # no adapter from a diverged run
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == ["step-000001"]
    from slimtune.train.checkpoint import read_checkpoint

    assert read_checkpoint(out / "checkpoints" / kept[0], slimtune.load_model(tiny_dir))["state"]["step"] == 1


@pytest.mark.parametrize("flag", ["--lr=inf", "--adapter.alpha=nan", "--lr_vectors=-inf", "--adapter.d.init=nan"])
def test_non_finite_settings_are_refused(tiny_dir, tmp_path, capsys, flag):
    assert train(tiny_dir, tmp_path, flag) == 2
    assert "not a finite number" in error_of(capsys)


def test_no_labelled_token_is_an_error(tiny_dir, tmp_path, capsys):
    assert train(tiny_dir, tmp_path, "--max_len", "1") == 2
    assert "no response token is left" in error_of(capsys)


# Silent data loss ------------------------------------------------------------------------------

def test_truncation_is_reported_and_counted(tiny_dir, tmp_path, capsys):
    rows = tmp_path / "long.jsonl"
    long = {"instruction": "word " * 3000, "output": "the answer"}
    rows.write_text("".join(json.dumps(r) + "\n" for r in [long] * 2 + demo_rows(22)))
    assert train(tiny_dir, tmp_path / "run", "--data", str(rows), "--val_fraction", "0", "--max_len", "64") == 0
    assert re.search(r"truncated to max_len=64: \d+ prompts and \d+ responses of 24", capsys.readouterr().out)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["truncation"]["prompts_cut"] >= 2


def test_a_missing_file_is_an_error_even_when_skipping_bad_rows(tiny_dir, tmp_path, capsys):
    good = rows_file(tmp_path)
    assert train(tiny_dir, tmp_path / "run", "--data", str(good), str(tmp_path / "gone.jsonl"),
                 "--on_bad_rows", "skip") == 2
    assert "gone.jsonl" in error_of(capsys)


def test_every_skipped_row_is_named(tiny_dir, tmp_path, capsys):
    path = rows_file(tmp_path)
    with open(path, "a") as f:
        f.write('{"instruction": "x"}\n{"prompt": 3, "completion": "y"}\nnot json\n')
    assert train(tiny_dir, tmp_path / "run", "--data", str(path), "--on_bad_rows", "skip") == 0
    printed = capsys.readouterr().out
    for line in (25, 26, 27):
        assert f"rows.jsonl:{line}" in printed
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["skipped_rows"]) == 3


# Misleading messages ---------------------------------------------------------------------------

@pytest.mark.parametrize("path, words", [("some/dir/nope.jsonl", "not found"), ("nope/x.json", "not found"),
                                         (".", "it is a directory")])
def test_missing_paths_and_directories_are_named_as_such(tiny_dir, tmp_path, capsys, monkeypatch, path, words):
    monkeypatch.chdir(tmp_path)
    assert train(tiny_dir, tmp_path / "run", "--data", path) == 2
    err = error_of(capsys)
    assert words in err and "datasets" not in err


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, name):
    from slimtune.data.rows import load_rows

    path = tmp_path / name
    rows = demo_rows(3)
    text = json.dumps(rows) if name.endswith(".json") else "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert len(load_rows([path])[0]) == 3


# One clear line instead of a traceback --------------------------------------------------------

@pytest.mark.parametrize("damage, words", [(b"", "the file is empty"), (None, "truncated")])
def test_a_damaged_adapter_file_is_one_clear_error(tiny_dir, tmp_path, capsys, damage, words):
    model = slimtune.add_adapter(slimtune.load_model(tiny_dir), slimtune.preset("tied-lora"))
    slimtune.save_adapter(model, tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    f.write_bytes(damage if damage is not None else f.read_bytes()[:100])
    assert main(["generate", "--model", tiny_dir, "--adapter", str(tmp_path / "a"), "--prompt", "hi"]) == 2
    assert words in error_of(capsys)


def test_config_files_that_are_missing_or_not_yaml(tiny_dir, tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "no such file" in error_of(capsys)
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\n  steps: [3\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "not valid YAML at line" in error_of(capsys)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert main(["eval", "--config", str(tmp_path / "list.yaml")]) == 2
    assert "not a mapping" in error_of(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(tiny_dir, tmp_path, capsys):
    assert train(tiny_dir, tmp_path, "--device", "cuda") == 2
    assert "no CUDA GPU" in error_of(capsys)
    assert main(["generate", "--model", tiny_dir, "--prompt", "x", "--device", "cuda:0"]) == 2
    assert "no CUDA GPU" in error_of(capsys)


def test_out_naming_a_file_fails_before_the_model_loads(tiny_dir, tmp_path, capsys, monkeypatch):
    import slimtune.train.loop as loop

    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("x")
    assert train(tiny_dir, tmp_path / "file") == 2
    assert "it is a file, not a directory" in error_of(capsys)


def test_a_model_directory_that_does_not_exist_fails_at_once(tmp_path, capsys):
    t0 = time.perf_counter()
    for model in (str(tmp_path / "no" / "such"), "./nowhere", "~/no/such/model"):
        assert main(["generate", "--model", model, "--prompt", "x"]) == 2
        assert "no such directory" in error_of(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--model", str(tmp_path / "empty"), "--prompt", "x"]) == 2
    assert "no config.json" in error_of(capsys)
    assert time.perf_counter() - t0 < 20  # no hub retries


def test_ctrl_c_before_training_is_a_clean_exit(tiny_dir, tmp_path, capsys, monkeypatch):
    import slimtune.recipes.train as job

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "evaluate_run", interrupt)  # Ctrl-C during the evaluation before training
    assert train(tiny_dir, tmp_path / "run") == 130
    assert "interrupted before training started" in error_of(capsys)
    monkeypatch.setattr(job, "setup", interrupt)  # and while the model loads
    assert train(tiny_dir, tmp_path / "run") == 130
    assert "interrupted" in error_of(capsys)


def test_resume_falls_back_past_a_damaged_checkpoint(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_dir, out, "--steps", "3", "--save_every", "1", "--keep_checkpoints", "3") == 0
    newest = out / "checkpoints" / "step-000003" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:50])
    capsys.readouterr()
    assert train(tiny_dir, out, "--steps", "4", "--save_every", "1", "--keep_checkpoints", "3", "--resume") == 0
    printed = capsys.readouterr().out
    assert "checkpoint step-000003 does not read" in printed and "resuming from step-000002" in printed
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


# All or nothing ---------------------------------------------------------------------------------

def test_resume_refuses_changed_settings_unless_allowed(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_dir, out, "--save_every", "1") == 0
    assert train(tiny_dir, out, "--steps", "3", "--resume", "--lr", "0.002") == 2
    err = error_of(capsys)
    assert "lr: None -> 0.002" in err and "--allow_config_change" in err
    data = rows_file(tmp_path)
    assert train(tiny_dir, out, "--steps", "3", "--resume", "--data", str(data)) == 2
    assert "data: ['demo'] ->" in error_of(capsys)
    assert train(tiny_dir, out, "--steps", "3", "--resume") == 0  # more steps: allowed
    assert train(tiny_dir, out, "--steps", "4", "--resume", "--lr", "0.002", "--allow_config_change", "true") == 0


def test_a_fresh_run_into_a_used_out_is_refused(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_dir, out, "--save_every", "1") == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert train(tiny_dir, out) == 2
    assert "checkpoints of an earlier run" in error_of(capsys)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing lost


def test_leftovers_of_a_crash_are_cleaned_up(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-step-000007-12345").mkdir(parents=True)
    (out / "checkpoints" / ".tmp-step-000007-12345" / "half").write_text("x")
    (out / "checkpoints" / ".latest-12345").write_text("step-000007")
    assert train(tiny_dir, out) == 0
    assert not list((out / "checkpoints").glob(".*"))
    assert "removed" in capsys.readouterr().out


def test_metrics_are_strict_json_and_written_once_after_a_resume(tiny_dir, tmp_path):
    from slimtune.recipes.train import _log

    out = tmp_path / "run"
    assert train(tiny_dir, out, "--log_every", "1") == 0
    (out / "adapter").rename(tmp_path / "adapter")  # as if killed during the final save
    assert train(tiny_dir, out, "--log_every", "1", "--resume") == 0
    _log(out / "metrics.jsonl", {"step": 9, "loss": float("nan"), "aux": [float("inf")]})
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) for line in lines]
    assert [r["step"] for r in records if r.get("final")] == [2]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 9]
    assert records[-1]["loss"] is None and records[-1]["aux"] == [None]


# Faults found by a 185-case bad-input table ------------------------------------------------------

@pytest.mark.parametrize("flag,value,message", [("--lr", "-1e-3", "a learning rate must be positive"),
                                                ("--lr_vectors", "-2E+1", "a learning rate must be positive"),
                                                ("--max_grad_norm", "-1", "must be at least 0"),
                                                ("--adapter.dropout", "-.5e0", "dropout")])
def test_a_negative_number_after_a_space_gets_slimtunes_own_message(tiny_dir, tmp_path, capsys, flag, value, message):
    assert train(tiny_dir, tmp_path, flag, value) == 2
    err = error_of(capsys)
    assert message in err and "expected one argument" not in err


def test_a_non_finite_number_in_a_peft_config_is_refused(tmp_path):
    import peft
    from conftest import tiny

    base = tiny("llama").requires_grad_(False)
    peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])).save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    conf["lora_alpha"] = float("nan")
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf))  # Python writes NaN, and reads it back
    with pytest.raises(slimtune.SlimtuneError, match=r"lora_alpha=nan .*not a finite number"):
        slimtune.load_adapter(tiny("llama"), tmp_path)


def test_a_peft_lora_with_exclude_modules_names_the_option(tmp_path):
    import peft
    from conftest import tiny

    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"])
    peft.get_peft_model(tiny("llama"), config).save_pretrained(tmp_path)
    with pytest.raises(slimtune.SlimtuneError, match=r"exclude_modules=.*slimtune does not implement this LORA option"):
        slimtune.load_adapter(tiny("llama"), tmp_path)


@torch.no_grad()
def test_an_ia3_vector_entry_of_0_refuses_an_in_place_merge_and_keeps_the_base(tmp_path):
    from conftest import tiny

    model = slimtune.add_adapter(tiny("llama"), slimtune.preset("ia3"))
    vectors = slimtune.trainable_parameters(model)
    next(iter(vectors.values()))[3] = 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(slimtune.SlimtuneError, match=r"entries of its vector l are 0.*merge_and_unload"):
        slimtune.merge_adapters(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed
    x = torch.randint(0, 64, (1, 5))
    want = model(x).logits
    torch.testing.assert_close(slimtune.merge_and_unload(model)(x).logits, want, atol=1e-5, rtol=1e-5)


def test_unmerging_a_lost_weight_is_a_slimtune_error():
    from slimtune.adapters.ia3 import IA3Linear
    from slimtune.adapters.inject import hosts

    model = slimtune.add_adapter(__import__("conftest").tiny("llama"), slimtune.preset("ia3"))
    site = next(s for _, h in hosts(model) for s in h.adapters.values() if isinstance(s, IA3Linear))
    with torch.no_grad():
        site.l[0] = 0.0
    with pytest.raises(slimtune.SlimtuneError, match="reload the base model"):
        site.unmerge_from(torch.ones(site.out_features, site.in_features), None)


@pytest.mark.parametrize("command", [["new"], ["demo-data"]])
def test_out_that_is_a_file_gets_a_fix(tiny_dir, tmp_path, capsys, command):
    file = tmp_path / "taken"
    file.write_text("keep me")
    extra = ["--model", tiny_dir] if command == ["new"] else []
    assert main(command + extra + ["--out", str(file)]) == 2
    err = error_of(capsys)
    assert "it is a file" in err and "Fix:" in err and "Errno" not in err
    assert file.read_text() == "keep me"


def test_new_refuses_to_overwrite_an_adapter_unless_told(tiny_dir, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert main(["new", "--model", tiny_dir, "--out", str(out)]) == 0
    trained = (out / "adapter_model.safetensors").read_bytes()
    assert main(["new", "--model", tiny_dir, "--method", "vera", "--out", str(out)]) == 2
    assert "already holds an adapter" in error_of(capsys) and "--overwrite" in capsys.readouterr().err + "--overwrite"
    assert (out / "adapter_model.safetensors").read_bytes() == trained
    assert main(["new", "--model", tiny_dir, "--method", "vera", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "VERA"


def test_a_wrong_type_in_the_config_file_is_reported_even_when_a_flag_overrides_it(tiny_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("steps: two\nbatch_size: 4\nadapter:\n  r: eight\n")
    assert train(tiny_dir, tmp_path / "run", "--config", str(config), "--steps", "2", "--adapter.r", "4") == 2
    err = error_of(capsys)
    assert "steps='two' in the --config file" in err and "adapter.r='eight' in the --config file" in err
    assert not (tmp_path / "run").exists()


def test_an_unknown_flag_gets_a_did_you_mean(tiny_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--rnak", "8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--rnak" in err and "did you mean '--rank'" in err
    with pytest.raises(SystemExit):
        main(["gist", "compress", "--instrution", "x"])
    assert "did you mean '--instruction'" in capsys.readouterr().err
