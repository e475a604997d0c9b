"""The same properties on a CUDA GPU, against the CPU computed in the test (skipped without one).

CI has no GPU: these run where one is lent (`pytest tests/test_cuda.py` there). TF32 is
switched off so that fp32 on the GPU is compared with fp32 on the CPU, not with 10-bit mantissas.
"""

from __future__ import annotations

import pytest
import torch
from conftest import batch, clone, layers, logits, perturb, tiny, tiny_preset

import slimtune
from slimtune.adapters import fast
from slimtune.adapters.fast.layer import FastLayer, siblings_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_fp32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def adapted(arch, method):
    base = tiny(arch).requires_grad_(False)
    model = slimtune.add_adapter(clone(base), tiny_preset(method))
    perturb(model)  # identity init off: every check below would otherwise hold trivially
    return base, model


def to(inputs: dict, device) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def loss_and_grads(model, inputs):
    """Two steps' forwards (the first learns sibling groups), the second's loss and gradients."""
    logits(model, inputs)
    out = logits(model, inputs)
    loss = (out.float() ** 2).mean()
    loss.backward()
    return out.detach().cpu(), {k: p.grad.detach().float().cpu() for k, p in slimtune.trainable_parameters(model).items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def test_fp32_on_cuda_matches_the_cpu(arch, method):
    """Outputs and every adapter gradient, through the fused functions and sibling sharing."""
    _, model = adapted(arch, method)
    gpu = clone(model).cuda()
    x = batch(model)
    out_c, g_c = loss_and_grads(model, x)
    out_g, g_g = loss_and_grads(gpu, to(x, "cuda"))
    torch.testing.assert_close(out_g, out_c, rtol=1e-4, atol=1e-5)
    assert g_g.keys() == g_c.keys() and g_c
    for k in g_c:
        torch.testing.assert_close(g_g[k], g_c[k], rtol=1e-3, atol=1e-5, msg=k)
    if method != "ia3" and arch != "gpt2":  # siblings shared their down-projection on the GPU too
        assert siblings_of(next(iter(layers(gpu).values()))).group_of


@pytest.mark.parametrize("method", ["lora", "vera", "tied-lora", "ia3"])
def test_bf16_base_with_fp32_adapters_under_autocast(method):
    """As `slimtune train` runs on a GPU: a bf16 base, fp32 adapters, bf16 autocast. Gradients
    stay fp32 and close to the fp32 model's (bf16's 8-bit mantissa: a few % in norm)."""
    _, model = adapted("llama", method)
    x = to(batch(model, B=4, T=16), "cuda")
    ref = clone(model).cuda()
    _, g_ref = loss_and_grads(ref, x)
    low = clone(model).cuda().to(torch.bfloat16)
    for p in slimtune.trainable_parameters(low).values():
        p.data = p.data.float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, g_low = loss_and_grads(low, x)
    for k, p in slimtune.trainable_parameters(low).items():
        assert p.dtype == p.grad.dtype == torch.float32, k
        assert rel(g_low[k], g_ref[k]) < 5e-2, (k, rel(g_low[k], g_ref[k]))


@torch.no_grad()
def test_merge_and_save_load_on_cuda(arch, method, tmp_path):
    base, model = adapted(arch, method)
    x = batch(model)
    expected = logits(model, x)
    gpu = clone(model).cuda()
    xg = to(x, "cuda")
    before = logits(gpu, xg)
    torch.testing.assert_close(before.cpu(), expected, rtol=1e-4, atol=1e-5)
    slimtune.save_adapter(gpu, tmp_path / "adapter")  # written from the GPU
    slimtune.merge_adapters(gpu)
    torch.testing.assert_close(logits(gpu, xg), before, rtol=0, atol=1e-5)
    with slimtune.disable_adapters(gpu):
        torch.testing.assert_close(logits(gpu, xg).cpu(), logits(base, x), rtol=1e-4, atol=1e-5)
    slimtune.unmerge_adapters(gpu)
    torch.testing.assert_close(logits(gpu, xg), before, rtol=0, atol=1e-5)
    on_cpu = slimtune.load_adapter(clone(base), tmp_path / "adapter")  # read back on the CPU
    torch.testing.assert_close(logits(on_cpu, x), expected, rtol=0, atol=0)
    back = slimtune.load_adapter(clone(base).cuda(), tmp_path / "adapter")  # and on the GPU
    assert all(t.is_cuda for t in slimtune.trainable_parameters(back).values())
    torch.testing.assert_close(logits(back, xg), before, rtol=0, atol=0)


def test_forms_agree_on_cuda(monkeypatch):
    """The reference, dense, per-token and dense-a forms give the same output and gradients on the GPU."""
    _, model = adapted("llama", "vera")
    model = model.cuda()
    x = to(batch(model), "cuda")
    with fast.reference():
        outs = [loss_and_grads(clone(model), x)]
    for form in ("dense", "per-token", "dense-a"):
        monkeypatch.setattr(FastLayer, "form", lambda self, x, parts, f=form: f)
        outs.append(loss_and_grads(clone(model), x))
    for other in outs[1:]:
        torch.testing.assert_close(other[0], outs[0][0], rtol=1e-4, atol=1e-5)
        for k in outs[0][1]:
            torch.testing.assert_close(other[1][k], outs[0][1][k], rtol=1e-3, atol=1e-5, msg=k)


def test_trainer_on_cuda_resumes_to_the_same_weights(tiny_dir, tmp_path, monkeypatch):
    """`slimtune train` on the GPU in bf16: loss falls, a Ctrl-C checkpoint resumes to the same run."""
    from test_train import adapter_weights, cfg_for, interrupted_run

    kw = dict(device="cuda", precision="bf16", steps=6, save_every=2, log_every=1, lr=3e-3)
    full = slimtune.run_training(cfg_for(tiny_dir, tmp_path / "full", **kw))
    losses = [full["losses"][k] for k in sorted(full["losses"])]
    assert losses[-1] < losses[0]
    interrupted_run(cfg_for(tiny_dir, tmp_path / "cut", **kw), 3, monkeypatch)
    resumed = slimtune.run_training(cfg_for(tiny_dir, tmp_path / "cut", resume=True, **kw))
    for k, v in resumed["losses"].items():
        assert v == pytest.approx(full["losses"][k], rel=1e-5)
    a, b = adapter_weights(tmp_path / "full"), adapter_weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
