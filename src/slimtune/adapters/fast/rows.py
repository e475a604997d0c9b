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
  applied with one batched product (`torch.bmm`). Sites that stack without waste form a
  family (a shared pair; or own matrices of one rank), and each family present in the batch
  is one such computation, so a rank-8 LoRA is never padded to VeRA's rank 256.
- (IA)³: l_i gathered, (N, 1, n), and applied as usual.

Stacks are cached per set of adapters and rebuilt when adapters are added, removed or loaded
(AdapterState.version). In training (gradients enabled) the stacks are built at every call
instead, so that they carry gradients to each adapter's own tensors and see this step's values;
a site with dropout in training leaves its rows to the host's grouping, which applies it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from . import using_reference

_CACHE: OrderedDict = OrderedDict()  # keys below -> stacked tensors, or a batch's slots
_CACHE_SIZE = 4096
_GATHERED: OrderedDict = OrderedDict()  # per module: (the latest arrangement of rows, what it gathered)
GATHER_MATRICES = True  # per-adapter A, B: gather (True) or leave the rows to the host's grouping (False)


def _cached(key, build):
    hit = _CACHE.get(key)
    if hit is None:
        hit = _CACHE[key] = build()
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return hit


def plan(what: str, sites: list, every: list, device, build):
    """(stacks over every adapter of this kind at the module, each row's slot among them (base
    rows get the extra slot S), a memo for what this arrangement of rows gathers from the
    stacks). All three are cached in inference: the stacks per set of adapters and version,
    the slots per arrangement of rows, the memo for the module's latest arrangement, so a
    decoding step over unchanged rows does no per-adapter work and gathers nothing again."""
    state = every[0].root.state
    key = (id(state), state.version, what, tuple(map(id, every)))
    rows = tuple(0 if s is None else id(s) for s in sites)

    def slots():
        where = {id(s): i for i, s in enumerate(every)}
        return torch.tensor([where.get(r, len(every)) for r in rows], device=device)  # base: slot S
    if torch.is_grad_enabled():  # training: fresh stacks that carry gradients and see this step's values
        return build(every), slots(), {}
    stacks, slot = _cached(key, lambda: build(every)), _cached((key, rows), slots)
    memo = _GATHERED.get(key)
    if memo is None or memo[0] != rows:
        memo = _GATHERED[key] = (rows, {})
        if len(_GATHERED) > _CACHE_SIZE:
            _GATHERED.popitem(last=False)
    return stacks, slot, memo[1]


def _gathered(memo: dict, name: str, make):
    hit = memo.get(name)
    if hit is None:
        hit = memo[name] = make()
    return hit


def _drops(every: list) -> bool:
    """Whether a site applies dropout now (training with dropout > 0)."""
    return any(s.training and isinstance(getattr(s, "dropout", None), torch.nn.Dropout) for s in every)


def _same(tensors: list[torch.Tensor]) -> bool:
    """One tensor seen through views: the same memory, shape and strides."""
    t0 = tensors[0]
    return all(t.data_ptr() == t0.data_ptr() and t.shape == t0.shape and t.stride() == t0.stride() for t in tensors)


def _lowrank_stacks(every: list) -> dict:
    parts = [s.parts() for s in every]  # (A, B, d, b) each
    A0, B0 = parts[0][0], parts[0][1]
    r, dtype, device = max(s.r for s in every), A0.dtype, A0.device
    shared_A, shared_B = _same([p[0] for p in parts]), _same([p[1] for p in parts])

    def vec(i, n):  # vector i (d or b) padded to n, 1 where absent; the base rows' slot last
        return torch.stack([torch.cat([p[i], p[i].new_ones(n - p[i].shape[0])]) if p[i] is not None
                            else torch.ones(n, dtype=dtype, device=device) for p in parts]
                           + [torch.ones(n, dtype=dtype, device=device)])
    out_f = every[0].out_features
    scale = torch.tensor([u.scale for u in every] + [0.0], dtype=dtype, device=device)  # base rows: 0
    has_d, has_b = any(p[2] is not None for p in parts), any(p[3] is not None for p in parts)
    return {
        "A0": A0 if shared_A else None, "B0": B0 if shared_B else None,
        "A": None if shared_A else torch.stack([F.pad(p[0], (0, 0, 0, r - p[0].shape[0])) for p in parts]
                                               + [A0.new_zeros(r, A0.shape[1])]),  # (S+1, r, in)
        "B": None if shared_B else torch.stack([F.pad(p[1], (0, r - p[1].shape[1])) for p in parts]
                                               + [B0.new_zeros(B0.shape[0], r)]),  # (S+1, out, r)
        "Bflat": None if shared_B else torch.cat([F.pad(p[1], (0, r - p[1].shape[1])) for p in parts]
                                                 + [B0.new_zeros(B0.shape[0], r)], 1),  # (out, (S+1) r)
        "d": vec(2, r) if has_d else None,  # (S+1, r); None: no adapter has d
        "bs": vec(3, out_f) * scale[:, None] if has_b else None,  # (S+1, out): b_i s_i; None: no adapter has b
        "s": scale,  # (S+1,)
        "dtype": dtype,
    }


def _families(every: list) -> list[list]:
    """The low-rank sites at a module, split into families that stack without waste: sites that
    read the same frozen A and B (VeRA adapters from one seed) form one family, and sites with
    matrices of their own form one family per rank. Stacking a rank-8 LoRA beside rank-256 VeRA
    would pad every LoRA to 256 and copy VeRA's shared pair once per adapter."""
    parts = [s.parts() for s in every]
    pair = [(p[0].data_ptr(), p[1].data_ptr(), tuple(p[0].shape), tuple(p[1].shape)) for p in parts]
    fams: dict = {}
    for s, k in zip(every, pair):
        fams.setdefault(k if pair.count(k) > 1 else ("own", s.r), []).append(s)
    return list(fams.values())


def lowrank_rows(base, sites: list, x: torch.Tensor, every: list) -> torch.Tensor | None:
    """Every row of x (N, T, in) through its own low-rank site (None: the base); `every`: all
    the low-rank sites at this module. One batched computation per family of sites present
    (`_families`); a family's computation gives the other rows its base slot (zero update)."""
    if using_reference() or _drops(every):
        return None
    state = every[0].root.state
    fams = _families(every) if torch.is_grad_enabled() else \
        _cached((id(state), state.version, "families", tuple(map(id, every))), lambda: _families(every))
    present = {id(s) for s in sites if s is not None}
    fams = [f for f in fams if any(id(s) in present for s in f)]
    planned = [plan("lowrank", sites, f, x.device, _lowrank_stacks) for f in fams]
    if not GATHER_MATRICES and any(st["A"] is not None or st["B"] is not None for st, _, _ in planned):
        return None
    y = base(x)  # W0 x (+ bias)                                              (N, T, out)
    for f, (st, slot, memo) in zip(fams, planned):
        y = _lowrank_update(y, x, f, st, slot, memo)
    return y


def _lowrank_update(y: torch.Tensor, x: torch.Tensor, every: list, st: dict, slot: torch.Tensor,
                    memo: dict) -> torch.Tensor:
    """y + s_i b_i ⊙ (B_i (d_i ⊙ (A_i x))) for every row i, over one family's stacks."""
    xa = x.to(st["dtype"])
    N, T = x.shape[:2]
    # Per-adapter matrices, decoding one token with fewer adapters than rows: applied for every
    # adapter at once and the row's block kept (each adapter's matrices read once). Otherwise
    # gathered per row; a decoding step keeps what it gathered for the next step over the same
    # rows (at most the size of the stacks: there are no more rows than adapters).
    every_at_once = T == 1 and len(every) + 1 < N
    keep = memo if T == 1 else {}
    rows = _gathered(memo, "rows", lambda: torch.arange(N, device=x.device))
    if st["A"] is None:
        h = F.linear(xa, st["A0"])  # A x, shared                               (N, T, r)
    elif every_at_once:
        S1, r = st["A"].shape[:2]
        h = F.linear(xa, st["A"].reshape(S1 * r, -1)).view(N, T, S1, r)[rows, :, slot]  # A_i x   (N, T, r)
    else:
        h = torch.bmm(xa, _gathered(keep, "At", lambda: st["A"][slot].transpose(1, 2)))  # A_i x    (N, T, r)
    if st["d"] is not None:
        h = h * _gathered(memo, "d", lambda: st["d"][slot][:, None, :])  # d_i ⊙ A_i x
    if st["B"] is None:
        h = F.linear(h, st["B0"])  # B (.), shared                                (N, T, out)
    elif every_at_once:
        S1, _, r = st["B"].shape
        blocks = h.new_zeros(N, T, S1, r)
        blocks[rows, :, slot] = h  # row i's h in adapter i's block                 (N, T, S+1, r)
        h = F.linear(blocks.view(N, T, S1 * r), st["Bflat"])  # Σ_s B_s (block s)           (N, T, out)
    else:  # s_i b_i folded into the gathered B_i: y + (.) B_i^T in one batched product
        def scaled_B():
            sb = st["bs"][slot] if st["bs"] is not None else st["s"][slot][:, None]  # (N, out) or (N, 1)
            return (st["B"][slot] * sb[:, :, None]).transpose(1, 2)  # (N, r, out)
        Bt = _gathered(keep, "Bt", scaled_B)
        if y.dtype == h.dtype:
            return torch.baddbmm(y, h, Bt)  # W0 x + s_i b_i ⊙ B_i (.)
        return y + torch.bmm(h, Bt).to(y.dtype)
    if st["bs"] is not None:
        return y + (h * _gathered(memo, "bs", lambda: st["bs"][slot][:, None, :])).to(y.dtype)  # + s_i b_i ⊙ (.)
    return y + (h * _gathered(memo, "s", lambda: st["s"][slot][:, None, None])).to(y.dtype)  # + s_i (.)


def _ia3_stacks(every: list):
    ref = every[0]
    if any((u.where, u.start, u.stop) != (ref.where, ref.start, ref.stop) for u in every):
        return None
    return torch.stack([u.full_vector() for u in every] + [torch.ones_like(ref.full_vector())])  # (S+1, n)


def ia3_rows(base, sites: list, x: torch.Tensor, every: list) -> torch.Tensor | None:
    """Every row of x through its own (IA)³ site: l_i gathered."""
    if using_reference():
        return None
    L, slot, memo = plan("ia3", sites, every, x.device, _ia3_stacks)
    if L is None:
        return None
    l = _gathered(memo, "l", lambda: L[slot][:, None, :])  # (N, 1, n)
    if every[0].where == "input":
        return base(x * l.to(x.dtype))
    y = base(x)
    return y * l.to(y.dtype)
