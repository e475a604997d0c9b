"""Sibling layers that read the same input share one down-projection.

q, k and v read the same x; so do gate and up. In the per-token form each of them computes
a = x Aᵀ, and in its backward ∂x += ∂a A and ∂A = ∂aᵀ x: three products of rank r per layer,
which CPU BLAS runs at a fraction of its rate at small r. A group makes each of them once:

    a = x [A_q; A_k; A_v]ᵀ (N, 3r)    ∂x += [∂a_q ∂a_k ∂a_v] [A_q; A_k; A_v]    ∂[A] = [∂a]ᵀ x

Where the layers use the same A (VeRA's frozen pair, Tied-LoRA with share="model") it is
stacked once: a = x Aᵀ is then one tensor that every member reads, and autograd sums their ∂a.

Groups are learned, not declared: a layer called with the very tensor (same object, same
version) that the adapted layer before it was called with joins that layer's run, and a run of
two or more becomes a group. A group is a plan, not a promise: a member called with another x
computes its own a, and the group's product only wasted its share. The result is the same.

Members are the fast path's records of the layers (layer.py's FastLayer): a group reads their
A, rank and shared-A key, and asks each whether its call would use a shared a.
"""

from __future__ import annotations

import weakref

import torch

from .fused import LowRankDown


class Siblings:
    """Model-level: the learned groups and, during a forward, each group's shared a."""

    def __init__(self):
        self.group_of: dict[int, tuple] = {}  # id(layer) -> its group, the layers in call order
        self.settled: set[int] = set()  # layers whose group (or lack of one) is known
        self._run: list = []  # layers called one after the other with the same x
        self._run_x, self._run_version = None, -1
        self._shared: dict[int, tuple] = {}  # id(group) -> (weakref to x, its version, {id(member): a})

    def __reduce__(self):  # copies and pickles learn their groups again
        return Siblings, ()

    def observe(self, layer, x: torch.Tensor) -> None:
        """Learn the groups: layer (a FastLayer) is being called with x (any form, no dropout)."""
        if id(layer) in self.settled:
            return
        if self._run_x is not None and self._run_x() is x and self._run_version == x._version \
                and layer not in self._run:
            self._run.append(layer)
            return
        run = [m for m in self._run if id(m) not in self.settled]
        if len(run) > 1:
            group = tuple(run)
            self.group_of.update((id(m), group) for m in run)
        self.settled.update(id(m) for m in run)
        self._run, self._run_x, self._run_version = [layer], weakref.ref(x), x._version

    def same_a(self, layer) -> tuple:
        """layer's group members that use its A (a shared one: VeRA's, a tied one), or (layer,)."""
        key = layer.a_key
        group = self.group_of.get(id(layer), ()) if key is not None else ()
        return tuple(m for m in group if m.a_key == key) or (layer,)

    def down(self, layer, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor | None:
        """layer's a = x Aᵀ (N, r) from its group's shared product, or None (no group: its own).

        x is the layer's input as called (the identity siblings are matched by); x2 is its rows
        in the dtype the product runs in."""
        group = self.group_of.get(id(layer))
        if group is None:
            return None
        entry = self._shared.get(id(group))
        if entry is not None and entry[0]() is x and entry[1] == x._version and id(layer) in entry[2]:
            a = entry[2].pop(id(layer))
            if not entry[2]:  # every member took its a: nothing of this forward stays referenced
                del self._shared[id(group)]
            return a
        members = [m for m in group if m is layer or m.shares_down(x)]
        stack, index, row = [], {}, {}  # the distinct A's, their indices, each member's index
        for m in members:
            key = m.a_key or id(m)  # a shared A (same_a's notion), or the layer's own
            if key not in index:
                index[key] = len(stack)
                stack.append(m.A())  # (r, in)
            row[id(m)] = index[key]
        A = stack[0] if len(stack) == 1 else torch.cat(stack)  # (R, in), R = r · distinct A's
        a = LowRankDown.apply(x2, A.to(x2.dtype))  # (N, R)
        parts = a.split(layer.r, dim=1) if len(stack) > 1 else [a]  # each (N, r)
        mine = {id(m): parts[row[id(m)]] for m in members}
        own = mine.pop(id(layer))
        if mine:
            self._shared[id(group)] = (weakref.ref(x), x._version, mine)
        return own
