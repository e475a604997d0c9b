"""The low-rank family's fast path: the formula of adapters/lowrank.py computed by fused
autograd functions (fused.py), in the form with the fewest multiply-adds for the batch
(forms.py), with the products in the operand order and split CPU BLAS runs fastest
(blas.py), and sibling layers sharing their down-projection (siblings.py).

It is entered by one call, `lowrank(site, base, x)`, which returns None where it does not
apply (a quantised base, whose W0 the functions cannot read) or when it is switched off:

    with slimtune.adapters.fast.reference():   # or SLIMTUNE_REFERENCE=1
        ...                                     # every site runs the reference formula

The tests run the property matrix both ways and hold the fast path equal to the reference.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .layer import FastLayer, fusable

_switch = {"reference": os.environ.get("SLIMTUNE_REFERENCE", "") not in ("", "0")}


def use_reference(on: bool = True) -> None:
    """Run the reference formula everywhere (True) or the fast path where it applies (False)."""
    _switch["reference"] = on


def using_reference() -> bool:
    return _switch["reference"]


@contextlib.contextmanager
def reference(on: bool = True):
    before = _switch["reference"]
    _switch["reference"] = on
    try:
        yield
    finally:
        _switch["reference"] = before


def lowrank(site, base: torch.nn.Module, x: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor | None:
    """The site's output through the fast path, or None (the reference then runs). `d`: a
    per-token d (..., r) for sites that compute one (MoLoRA's router weights)."""
    if _switch["reference"] or not fusable(base):
        return None
    return FastLayer.of(site)(base, x, d)
