"""Give freed host memory back to the operating system between blocks.

Factorizing a block allocates and frees float64 temporaries of tens of megabytes (Grams, SVD
workspaces). glibc's allocator keeps freed chunks below its mmap threshold in its heaps, so without
this the resident set grows with every block although no tensor outlives its block (measured with
benchmarks/perf.py: about 28 MB per block at hidden 1024, the size of that block's temporaries).
``malloc_trim(0)`` returns the free heap pages; it costs well under a millisecond. A no-op where the C
library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)


def _load_trim():  # type: ignore[no-untyped-def]
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_TRIM = _load_trim()


def release_freed_memory() -> None:
    """Return the allocator's free heap pages to the operating system (glibc only)."""
    if _TRIM is not None:
        _TRIM(0)
