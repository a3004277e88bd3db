"""The merge's and the check's elementwise passes over a row tile: in C where the optional extension was built
(``_kernels.c``), else in numpy (``plain.py``); the same bytes either way. ``LORA_MERGE_PLAIN=1`` asks for the
numpy passes even where the extension is there (the tests compare the two)."""

from __future__ import annotations

import os

from . import plain

BF16, F16, F32 = plain.BF16, plain.F16, plain.F32
COLS, pack = plain.COLS, plain.pack
KINDS = {"BF16": BF16, "F16": F16, "F32": F32}  # safetensors' dtype names

PLAIN = os.environ.get("LORA_MERGE_PLAIN", "") not in ("", "0")
try:
    if PLAIN:
        raise ImportError("the numpy passes were asked for")
    from . import _kernels as _chosen

    ACCELERATED = True
except ImportError:
    _chosen = plain
    ACCELERATED = False
try:  # FP8 with block scales: fp8_merge, fp8_encode, fp8_check
    if PLAIN:
        raise ImportError("the numpy passes were asked for")
    from . import _fp8 as FP8
except ImportError:
    FP8 = plain.FP8
try:  # MXFP4 experts: mx_merge, mx_check
    if PLAIN:
        raise ImportError("the numpy passes were asked for")
    from . import _mxfp4 as MXFP4
except ImportError:
    MXFP4 = plain.MXFP4

merge16, merge32, check16, check32 = _chosen.merge16, _chosen.merge32, _chosen.check16, _chosen.check32
first_difference, nonfinite, gather, trip = _chosen.first_difference, _chosen.nonfinite, _chosen.gather, _chosen.trip
exact = _chosen.exact
survival = _chosen.survival
