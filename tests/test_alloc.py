"""slimtune.alloc: freed memory stays in the process, so the next step takes no page faults."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

STEPS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from slimtune.train.memory import keep_freed_memory
    assert keep_freed_memory()
def step():  # a forward's activations: 2-8 MiB blocks, half kept until the step ends; the logits
    kept = [torch.ones(80 * 2**20)]  # 320 MiB: more than the heap holds free, above any mmap threshold
    for i in range(40):
        t = torch.ones((1 + i % 4) * 2**19)
        if i % 2:
            kept.append(t)
for _ in range(5):  # the heap grows over the first few
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_kept_memory_spares_the_next_steps_page_faults():
    default, kept = faults("default"), faults("keep")
    assert default > 80000  # glibc returns the blocks and faults them back in: ~350 MiB per step
    assert kept < default / 20


def test_keep_freed_memory_is_a_no_op_where_it_cannot_apply(monkeypatch):
    from slimtune.train import memory as alloc

    monkeypatch.setattr(alloc.sys, "platform", "darwin")
    assert alloc.keep_freed_memory() is False
