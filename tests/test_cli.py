"""The command line, end to end on a tiny model, and `slimtune params` against the papers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch, tiny
from transformers import AutoModelForCausalLM

import slimtune
from slimtune.cli import main


@pytest.mark.parametrize("model,method,rank,expected", [
    ("llama-2-7b", "lora", 64, 159_907_840),  # the "159.9M" the VeRA paper quotes
    ("llama-2-7b", "vera", 256, 1_417_216),  # "1.4M"
    ("llama-2-7b", "vera", 1024, 1_589_248),  # "1.6M"
])
def test_params_reproduces_the_papers(capsys, model, method, rank, expected):
    assert main(["params", "--model", model, "--method", method, "--rank", str(rank), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable"] == expected


def test_params_formulas_for_every_shipped_config(capsys):
    # Reference computed here from the configs: LoRA = L * sum r(in + out), VeRA = L * sum (out + r).
    for name in ["llama-2-13b", "llama-3-8b", "smollm2-135m"]:
        cfg = json.loads((slimtune.models.load.CONFIGS / f"{name}.json").read_text())
        h, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
        kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
        shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]  # (in, out)
        for method, r, per_layer in [("lora", 8, lambda i, o, r: r * (i + o)), ("vera", 256, lambda i, o, r: o + r)]:
            main(["params", "--model", name, "--method", method, "--rank", str(r), "--json"])
            got = json.loads(capsys.readouterr().out)
            assert got["trainable"] == L * sum(per_layer(i, o, r) for i, o in shapes), (name, method)


def test_params_tied_lora_share_of_lora(capsys):
    # vBuA: tied A, B per module kind (sum r(in+out)) plus per-layer u (r) and v (out).
    main(["params", "--model", "llama-2-7b", "--method", "vbua", "--rank", "8", "--json"])
    tied = json.loads(capsys.readouterr().out)["trainable"]
    h, f, L, r = 4096, 11008, 32, 8
    shapes = [(h, h)] * 4 + [(h, f)] * 2 + [(f, h)]
    assert tied == sum(r * (i + o) for i, o in shapes) + L * sum(r + o for i, o in shapes)
    main(["params", "--model", "llama-2-7b", "--method", "lora", "--rank", "8", "--json"])
    assert tied / json.loads(capsys.readouterr().out)["trainable"] < 0.13


def test_params_t5(capsys):
    assert main(["params", "--model", "t5-v1_1-xxl", "--method", "ia3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    # k, v in 24 encoder self-attn + 24 decoder self- and cross-attn (inner 64 * 64 = 4096), wo input d_ff 10240
    assert got["trainable"] == 2 * 4096 * (24 + 48) + 10240 * 48


def test_bad_flag_is_a_clear_error(capsys):
    assert main(["params", "--model", "llama-2-7b", "--method", "lora", "--A.mode", "tide"]) == 2
    err = capsys.readouterr().err
    assert "A.mode='tide'" in err and "did you mean 'tied'" in err


def test_new_merge_end_to_end(tmp_path, capsys):
    base = tiny("llama")
    base.save_pretrained(tmp_path / "base")
    args = ["new", "--model", str(tmp_path / "base"), "--method", "vera", "--rank", "16",
            "--b.init", "0.5", "--out", str(tmp_path / "adapter")]
    assert main(args) == 2  # b = 0.5 and d = 0.1 leave no zero factor: the model would not start as the base
    assert "no zero-initialised part" in capsys.readouterr().err
    assert main(["new", "--model", str(tmp_path / "base"), "--method", "lora", "--out", str(tmp_path / "adapter")]) == 0
    # give the saved adapter non-zero B so that merging changes the weights
    model = slimtune.load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        for p in slimtune.trainable_parameters(model).values():
            p.normal_(0, 0.05)
    slimtune.save_adapter(model, tmp_path / "adapter")
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    x = batch(base)
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits, model(**x).logits, atol=1e-5, rtol=0)
        assert (merged(**x).logits - base(**x).logits).abs().max() > 1e-3


def test_check_passes_for_every_preset(tiny_dir, capsys):
    """`slimtune check` on a tiny model: every preset, mixtures included (their merge refused)."""
    assert main(["check", "--model", tiny_dir]) == 0
    printed = capsys.readouterr().out
    assert "all checks passed" in printed
    for name in slimtune.PRESETS:
        assert f"\n{name} " in printed
    assert printed.count("refused") == 4  # mov, molora, mixlora, pesc
