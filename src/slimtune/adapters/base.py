"""The adapter contract.

An adapter module declares its trained tensors in one place, `adapter_params()`, and its
frozen ones in `frozen_tensors()`. Every helper (freezing, counting, saving, merging)
reads those declarations; nothing finds adapter parameters by name.

Two kinds of module take part:
- `AdapterLayer` wraps one frozen base layer (nn.Linear or transformers' Conv1D) and
  knows how to fold itself into that layer's weight (`merge_into` / `unmerge_from`).
- `SharedTensors` lives once at model level (`model.slimtune_shared`) and holds the
  tensors several layers use: tied trained matrices and frozen random ones.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..targets import dims


def init_tensor(shape: tuple[int, ...], init: str | float, gen: torch.Generator, device, dtype) -> torch.Tensor:
    """A tensor drawn on the CPU from `gen` (so it can be regenerated from the seed), then moved."""
    if torch.device(device).type == "meta":
        return torch.empty(shape, device="meta", dtype=dtype)
    fan_in = shape[1] if len(shape) == 2 else shape[0]
    if init == "zeros":
        t = torch.zeros(shape)
    elif init == "ones":
        t = torch.ones(shape)
    elif init == "normal":
        t = torch.randn(shape, generator=gen) * 0.02
    elif init in ("kaiming_uniform", "he_uniform"):
        # kaiming_uniform: nn.Linear's default (a = sqrt(5)), bound 1/sqrt(fan_in), as LoRA/PEFT use;
        # he_uniform: gain sqrt(2), bound sqrt(6 / fan_in), as VeRA's reference code uses.
        bound = 1 / math.sqrt(fan_in) if init == "kaiming_uniform" else math.sqrt(6 / fan_in)
        t = torch.empty(shape).uniform_(-bound, bound, generator=gen)
    else:
        t = torch.full(shape, float(init))
    return t.to(device=device, dtype=dtype)


class AdapterLayer(nn.Module):
    """Wraps a frozen base layer; the adapter is applied unless disabled or merged."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = dims(base)
        self.enabled = True
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:  # code in transformers reads `layer.weight` (T5's FFN): the base's
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The tensors this layer owns and trains (shared ones are declared by SharedTensors)."""
        raise NotImplementedError

    def frozen_tensors(self) -> dict[str, torch.Tensor]:
        """Frozen per-layer tensors; saved only when the user asks (they regenerate from the seed)."""
        return {}

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """(W', b') with the adapter folded in; weight is (out, in) in float32. Pure."""
        raise NotImplementedError

    def unmerge_from(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """The inverse of merge_into. Pure."""
        raise NotImplementedError

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged:
            return self.base(x)
        return self.adapted(x)


class SharedTensors(nn.Module):
    """Model-level tensors used by many layers, created once from the adapter's seed.

    Trained ones (tied) are Parameters; frozen random ones are buffers that are not part
    of the saved adapter unless `save_frozen` asks for it: they are regenerated.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.trained_names: list[str] = []
        self.frozen_names: list[str] = []

    def add(self, name: str, tensor: torch.Tensor, trained: bool) -> None:
        if trained:
            self.register_parameter(name, nn.Parameter(tensor))
            self.trained_names.append(name)
        else:
            self.register_buffer(name, tensor, persistent=False)
            self.frozen_names.append(name)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {n: getattr(self, n) for n in self.trained_names}

    def frozen_tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.frozen_names}
