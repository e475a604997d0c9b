"""Keep freed memory in the process between training steps (CPU, glibc).

glibc's malloc gives large freed blocks back to the operating system: blocks above its mmap
threshold are unmapped when freed, and free space at the top of the heap is trimmed. The next
step allocates the same tensors again and the kernel faults every page back in, zero-filled.

`keep_freed_memory()` makes the main heap serve every block (mmap off: M_MMAP_MAX = 0, the
threshold at its largest, 32 MiB, for glibc's other arenas) and lifts the trim threshold to
2 GiB, so freed blocks stay in the heap and are reused by the next step. Blocks above 32 MiB
matter most: the loss's (N, vocab) logits, log-softmax and its gradient are faulted back in
every step under any threshold. The resident set stays at the step's peak, which training
reaches every step anyway. It is what PyTorch's CPU tuning guide gets from swapping in
jemalloc or tcmalloc, without a preload. glibc's threads' arenas still map a block their heaps
cannot hold, so nothing fails for want of mmap. `slimtune train` calls it for CPU runs
(TrainConfig.keep_freed_memory); it is process-wide and cannot be undone. What it saves is
measured by bench/malloc.py (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc <malloc.h>
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: larger values are refused
TRIM_THRESHOLD = 2**31 - 1  # the largest int mallopt takes: trim only past 2 GiB of free heap top


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks, of any size, for reuse; True if it took effect
    (False on other C libraries and platforms, where nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(k, v) for k, v in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                          (M_MMAP_MAX, 0)))
