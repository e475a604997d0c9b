"""Tiny random models built from configs (never downloaded) and helpers shared by the tests."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, T5Config, T5ForConditionalGeneration)

import slimtune

VOCAB = 64
# Hidden 32 and intermediate 48, with fewer kv heads than heads: layers of several shapes, so
# VeRA's shared pair is really sliced and Tied-LoRA ties per module kind.
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ARCHS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**LLAMA_LIKE)),  # biases on q, k, v
    "mistral": lambda: MistralForCausalLM(MistralConfig(**LLAMA_LIKE, sliding_window=None)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "t5": lambda: T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_ff=48, d_kv=8, num_heads=4,
                                                      num_layers=2, num_decoder_layers=2,
                                                      feed_forward_proj="gated-gelu", decoder_start_token_id=0)),
}
METHODS = ["lora", "full", "vera", "tied-lora", "tied-lora-ba", "tied-lora-paper", "ia3", "mov", "molora", "mixlora", "pesc"]
MIXTURES = ["mov", "molora", "mixlora", "pesc"]  # they route per token and do not merge
SMALL_RANK = {"vera": 16}  # keep VeRA's shared pair small on tiny models


def tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = ARCHS[arch]().eval()
    with torch.no_grad():  # transformers zero-initialises some biases: make them non-trivial
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model


def tiny_preset(method: str):
    r = SMALL_RANK.get(method)
    return slimtune.preset(method, **({"r": r} if r else {}))


def batch(model, seed: int = 1, B: int = 2, T: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    out = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        out["decoder_input_ids"] = torch.randint(0, VOCAB, (B, T - 2), generator=g)
    return out


def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


@torch.no_grad()
def perturb(model, seed: int = 2) -> None:
    """Switch identity init off: every trained adapter tensor gets random, non-identity values."""
    g = torch.Generator().manual_seed(seed)
    for t in slimtune.trainable_parameters(model).values():
        noise = torch.randn(t.shape, generator=g)
        # vectors move 0.1 around their init (1 for (IA)3 and Tied-LoRA, 0 for VeRA's b);
        # matrices (a zero B included) become small random ones.
        t.copy_(t + 0.1 * noise if t.dim() == 1 else 0.05 * noise)


@pytest.fixture(params=list(ARCHS))
def arch(request):
    return request.param


@pytest.fixture(params=METHODS)
def method(request):
    return request.param


def clone(model):
    return copy.deepcopy(model)


def layers(model, name=None) -> dict:
    """{module name: site adapter} of the model's active adapter (or the one named)."""
    return dict(slimtune.adapters.sites(model, name))


def shared(model, name=None):
    """The adapter's root: its config and the tensors its layers share."""
    from slimtune.adapters.inject import root

    return root(model, name)


@pytest.fixture(params=["fast", "reference"])
def path(request):
    """Run a test on the fast path and again on the reference formula (adapters/fast)."""
    from slimtune.adapters import fast

    with fast.reference(request.param == "reference"):
        yield request.param


def make_tokenizer(directory) -> "object":
    """A small byte-level BPE tokenizer with a ChatML chat template, trained on the demo data (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slimtune.data.demo import demo_rows

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [" ".join(r.values()) for r in demo_rows(500)] + ["Instruction: Input: Output: ### Response:"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
                          "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
    fast.save_pretrained(directory)
    return fast


def make_model_dir(directory, arch: str = "llama", seed: int = 0):
    """A tiny random model with the tiny tokenizer, saved as a model directory."""
    tok = make_tokenizer(directory)
    torch.manual_seed(seed)
    cfg = dict(LLAMA_LIKE, vocab_size=len(tok), max_position_embeddings=256)
    model = (LlamaForCausalLM(LlamaConfig(**cfg)) if arch == "llama" else Qwen2ForCausalLM(Qwen2Config(**cfg)))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return str(make_model_dir(tmp_path_factory.mktemp("tiny-llama")))


def split_tokens(monkeypatch, split: bool) -> None:
    """Make adapters/blas.py split the products over tokens even for a handful of them (3 threads,
    chunks of 1 token or more), or never."""
    from slimtune.adapters.fast import blas

    monkeypatch.setattr(blas, "MIN_ROWS", 1 if split else 10**9)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
