"""Mixed-adapter batches in one computation: every row with its own adapter, gathered by index.

The reference is the host's `grouped_rows` (adapters/protocol.py): each adapter's rows run as a
sub-batch of their own, as PEFT's `adapter_names` does. Here the rows' tensors are stacked
once per set of adapters (S adapters, plus one identity slot for base rows) and gathered by
each row's slot, so one batched computation serves every row:

- low-rank family, h = W0 x + s_i · b_i ⊙ (B_i (d_i ⊙ (A_i x))) for row i: where every
  adapter reads the *same* A (VeRA's frozen random pair, shared between adapters made from the
  same seed) A x is computed once for the whole batch, and likewise B; only the vectors d_i,
  b_i and the scale s_i are gathered, so a batch over many VeRA adapters costs what a batch
  over one does. Per-adapter matrices (LoRA, Tied-LoRA) are gathered too, (N, r, in), and
  applied with one batched product (`torch.bmm`); ranks that differ are zero-padded.
- (IA)³: l_i gathered, (N, 1, n), and applied as usual.

Stacks are cached per set of adapters and rebuilt when adapters are added, removed or loaded
(AdapterState.version). Rows mode is for inference: no dropout, no gradient bookkeeping.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from . import using_reference

_CACHE: OrderedDict = OrderedDict()  # (state id, version, site ids, what) -> stacked tensors
_CACHE_SIZE = 4096
GATHER_MATRICES = True  # per-adapter A, B: gather (True) or leave the rows to the host's grouping (False)


def _cached(sites: list, what: str, build):
    state = sites[0].root.state
    key = (id(state), state.version, tuple(id(s) for s in sites), what)
    hit = _CACHE.get(key)
    if hit is None:
        hit = _CACHE[key] = build()
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return hit


def slots(sites: list, device) -> tuple[list, torch.Tensor]:
    """(the distinct sites, in order; each row's slot among them, the base rows' slot = S)."""
    uniq = list(dict.fromkeys(s for s in sites if s is not None))
    where = {id(s): i for i, s in enumerate(uniq)}
    slot = torch.tensor([where[id(s)] if s is not None else len(uniq) for s in sites], device=device)
    return uniq, slot


def _same(tensors: list[torch.Tensor]) -> bool:
    """One tensor seen through views: the same memory, shape and strides."""
    t0 = tensors[0]
    return all(t.data_ptr() == t0.data_ptr() and t.shape == t0.shape and t.stride() == t0.stride() for t in tensors)


def lowrank_rows(base, sites: list, x: torch.Tensor) -> torch.Tensor | None:
    """Every row of x (N, T, in) through its own low-rank site (None: the base)."""
    if using_reference():
        return None
    uniq, slot = slots(sites, x.device)
    parts = [s.parts() for s in uniq]  # (A, B, d, b) each
    shared_A, shared_B = _same([p[0] for p in parts]), _same([p[1] for p in parts])
    if not GATHER_MATRICES and not (shared_A and shared_B):
        return None
    r = max(s.r for s in uniq)
    dtype = parts[0][0].dtype

    def stacks():
        def vec(i, n, fill):  # vector i (d or b) padded to n, its identity where absent
            return [torch.cat([p[i], p[i].new_full((n - p[i].shape[0],), fill)]) if p[i] is not None
                    else torch.full((n,), fill, dtype=dtype, device=x.device) for p in parts]
        out_f = uniq[0].out_features
        d = torch.stack(vec(2, r, 1.0) + [torch.ones(r, dtype=dtype, device=x.device)])  # (S+1, r)
        b = torch.stack(vec(3, out_f, 1.0) + [torch.ones(out_f, dtype=dtype, device=x.device)])  # (S+1, out)
        s = torch.tensor([u.scale for u in uniq] + [0.0], dtype=dtype, device=x.device)  # (S+1,) base rows: 0
        A = None if shared_A else torch.stack([F.pad(p[0], (0, 0, 0, r - p[0].shape[0])) for p in parts]
                                              + [parts[0][0].new_zeros(r, parts[0][0].shape[1])])  # (S+1, r, in)
        B = None if shared_B else torch.stack([F.pad(p[1], (0, r - p[1].shape[1])) for p in parts]
                                              + [parts[0][1].new_zeros(parts[0][1].shape[0], r)])  # (S+1, out, r)
        return d, b * s[:, None], A, B

    d, bs, A, B = _cached(uniq, "lowrank", stacks)
    y = base(x)  # W0 x (+ bias)                                              (N, T, out)
    xa = x.to(dtype)
    h = F.linear(xa, parts[0][0]) if A is None else torch.bmm(xa, A[slot].transpose(1, 2))  # A_i x      (N, T, r)
    h = h * d[slot][:, None, :]  # d_i ⊙ A_i x
    h = F.linear(h, parts[0][1]) if B is None else torch.bmm(h, B[slot].transpose(1, 2))  # B_i (.)     (N, T, out)
    return y + (h * bs[slot][:, None, :]).to(y.dtype)  # + s_i b_i ⊙ (.)


def ia3_rows(base, sites: list, x: torch.Tensor) -> torch.Tensor | None:
    """Every row of x through its own (IA)³ site: l_i gathered."""
    if using_reference():
        return None
    uniq, slot = slots(sites, x.device)
    ref = uniq[0]
    if any((u.where, u.start, u.stop) != (ref.where, ref.start, ref.stop) for u in uniq):
        return None
    L = _cached(uniq, "ia3", lambda: torch.stack([u.full_vector() for u in uniq]
                                                 + [torch.ones_like(ref.full_vector())]))  # (S+1, n)
    l = L[slot][:, None, :]  # (N, 1, n)
    if ref.where == "input":
        return base(x * l.to(x.dtype))
    y = base(x)
    return y * l.to(y.dtype)
