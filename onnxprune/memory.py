"""Handing memory back to the system between the stages of a run: the cycles of the
stage's graphs are collected, glibc's heap is trimmed and the weight store's pages are
dropped from the resident set (they come back from the page cache when read again)."""

from __future__ import annotations

import ctypes
import gc
import os

from onnxprune import weightstore
from onnxprune.weightstore import live_stores, release_pages

# a process holding less than this, with no weight store, is not worth the collection
RELEASE_ABOVE = 1 << 30
_TRIM = None


def release_memory() -> None:
    """Free what the last stage left. For a run over a large model (its weight store
    holds ``STORE_MIN_BYTES`` or more) or a process past ``RELEASE_ABOVE`` resident bytes:
    collect garbage cycles (graphsurgeon graphs are cycles and may hold arrays) and return
    freed heap pages to the system (glibc keeps them: ~4 GB after scoring on a BERT-base
    main job before). Then drop the stores' pages. A no-op where there is no glibc or no
    /proc."""
    held = sum(store.size for store in live_stores())
    if held >= weightstore.STORE_MIN_BYTES or resident_bytes() > RELEASE_ABOVE:
        gc.collect()
        _trim_heap()
    release_pages()


def _trim_heap() -> None:
    global _TRIM
    if _TRIM is None:
        try:
            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


def resident_bytes() -> int:
    """This process's resident set (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
