"""Transparent huge pages for the arrays a query reads at random: a server's global vectors and HNSW graph.

A scan plan reads thousands of rows scattered over a 1.5 GB array (1M photos at d=384) and an HNSW walk hops
between rows the same way: with 4 KiB pages nearly every row costs a TLB miss and a page-table walk. Backed by
2 MiB pages the same reads took 2.8 instead of 4.0 ms (10,000 rows of 1M) and an unfiltered HNSW search 0.23
instead of 0.28 ms (scripts/bench_filters.py, this machine). Linux gives them to memory already written through
madvise(MADV_COLLAPSE) (Linux 6.1+): the kernel copies the range into huge pages there and then (~1 s per GB),
whatever the system's THP setting says, unless THP is "never" or disabled for the process (prctl
PR_SET_THP_DISABLE) — then, or on another OS or an older kernel, the memory simply stays on small pages.
Only anonymous memory qualifies: a file mapping (FAISS's IO_FLAG_MMAP_IFC) is refused, so `Engine` reads a
server's global segments whole (EngineConfig.resident) before it asks.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import numpy as np

HUGE = 2 << 20  # bytes in one huge page (x86-64 and most arm64 kernels)
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25


@functools.cache
def _madvise():
    """libc's madvise, or None where there is none to call (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def on_huge_pages(array: np.ndarray) -> str:
    """Ask the kernel to back the whole 2 MiB pages inside ``array``'s memory with huge pages, now. The answer:
    "huge" (done), "small" (the array spans no whole huge page: nothing to do), "refused" (the kernel said no:
    THP off for this process or the system, a file mapping, a kernel before 6.1; the reason follows a colon) or
    "unsupported" (no madvise on this OS). Never raises: huge pages only make reads faster."""
    if os.environ.get("DINOSEARCH_HUGE_PAGES", "1") == "0":
        return "refused: DINOSEARCH_HUGE_PAGES=0"
    start = (array.ctypes.data + HUGE - 1) & ~(HUGE - 1)
    end = (array.ctypes.data + array.nbytes) & ~(HUGE - 1)
    if end <= start:
        return "small"
    madvise = _madvise()
    if madvise is None:
        return "unsupported"
    madvise(start, end - start, MADV_HUGEPAGE)  # later faults in the range too (kernels without MADV_COLLAPSE)
    if madvise(start, end - start, MADV_COLLAPSE) != 0:
        return f"refused: {os.strerror(ctypes.get_errno())}"
    return "huge"
