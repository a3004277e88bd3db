"""numpy's BLAS kept to one thread while the writer runs: the merge and the check each multiply small row tiles on a
core of their own, and BLAS's own threads, spread over the same cores, only wait on each other (measured on 2
cores: each tile's product 2-3 times slower with OpenBLAS's default threads)."""

from __future__ import annotations

import ctypes
import logging
from contextlib import contextmanager

log = logging.getLogger("lora_merge")
# (get, set) entry points by library: numpy's own OpenBLAS build renames them
_NAMES = [("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
          ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
          ("openblas_get_num_threads", "openblas_set_num_threads")]


def _openblas():
    """numpy's OpenBLAS, as (get, set) functions, when it is the BLAS numpy loaded (None otherwise)."""
    import numpy  # noqa: F401 - loads its BLAS

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for get, put in _NAMES:
            if hasattr(lib, get) and hasattr(lib, put):
                return getattr(lib, get), getattr(lib, put)
    return None


@contextmanager
def one_thread():
    """numpy's matrix products on one thread within the context (where its BLAS says how many it uses)."""
    found = _openblas()
    if found is None:
        yield
        return
    get, put = found
    before = get()
    put(1)
    try:
        yield
    finally:
        put(before)
