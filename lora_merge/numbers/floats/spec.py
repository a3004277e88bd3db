"""The float formats' definition, which the merge and the check both follow: the output dtypes, their unit
roundoff, how a value is rounded once to one of them (ties to even) and encoded as stored."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from ... import kernels
from ...adapter import AddScaled, FileTensor, LowRank, MemoryTensor
from ...safetensors_file import TensorInfo

FLOATS = ("BF16", "F16", "F32")
UNIT32, UNIT64 = 2.0**-24, 2.0**-53  # unit roundoff of float32 and float64
OPEN_SHARE = 16  # room for 1 in 16 elements left open by the kernels (typically 1 in 500 are)
# mantissa bits, smallest normal exponent and largest exponent of each output dtype
FORMATS = {"BF16": (7, -126, 127), "F16": (10, -14, 15), "F32": (23, -126, 127)}


def round_float64(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded once to the nearest value of ``dtype`` (as float64): through float32 with round to
    odd, which with 13 or more spare bits gives the same as rounding directly."""
    with np.errstate(all="ignore"):
        x32 = x.astype(np.float32)
        if dtype == "F32":
            return x32.astype(np.float64)
        back = x32.astype(np.float64)
        bits = x32.view(np.uint32).copy()
        odd = (back != x) & ((bits & 1) == 0) & np.isfinite(x)
        away = np.abs(x) > np.abs(back)
        bits[odd & away] += 1
        bits[odd & ~away] -= 1
        y = bits.view(np.float32)
        if dtype == "F16":
            return y.astype(np.float16).astype(np.float64)
        return kernels.plain.load(kernels.BF16, kernels.plain.round16(kernels.BF16, y), wide=True)


def half_spacing(o: np.ndarray, v: np.ndarray, dtype: str) -> np.ndarray:
    """Half the distance from each value ``o`` of ``dtype`` to its neighbour on ``v``'s side (0 at infinity)."""
    mant, emin, _ = FORMATS[dtype]
    with np.errstate(all="ignore"):
        _, e = np.frexp(o)  # o = f · 2^e, f in [0.5, 1); 0 for o = 0
        e = np.where(o == 0, emin, np.maximum(e - 1, emin))
        h = np.ldexp(1.0, e - mant - 1)
        power = (np.abs(o) == np.ldexp(1.0, e)) & (e > emin) & (np.abs(v) < np.abs(o))
        return np.where(np.isfinite(o), np.where(power, h / 2, h), 0.0)


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """Values of ``dtype`` (held as float64, exactly) as the output's elements: uint16 bits, or float32."""
    if dtype == "F32":
        return values.astype(np.float32)
    if dtype == "F16":
        return values.astype(np.float16).view(np.uint16)
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def round_fraction(q: Fraction, dtype: str) -> float:
    """The exact rational ``q`` rounded to the nearest value of ``dtype``, ties to even, past the largest finite
    value (by half a unit or more) to infinity."""
    mant, emin, emax = FORMATS[dtype]
    a = abs(q)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    unit = Fraction(2) ** (max(e, emin) - mant)
    value = round(a / unit) * unit  # round() of a Fraction: half to even
    largest = (2 - Fraction(2) ** -mant) * Fraction(2) ** emax
    result = math.inf if value > largest else float(value)
    return -result if q < 0 else result


def takes(entry, device_type: str) -> bool:
    """Whether ``entry`` is merged here: on the CPU, a tensor of a float dtype as BASE stores it (not quantized),
    written in a float dtype, changed only by low-rank products on its own two axes and LoRA's bias, whose
    factors are float32, bfloat16 or float16 tensors (read from a file or already in memory)."""
    base, ops = entry.base, entry.ops
    if device_type != "cpu" or not isinstance(base, TensorInfo) or base.dtype not in FLOATS or entry.dtype not in FLOATS:
        return False
    if entry.shape != base.shape or not entry.shape or ops is None and entry.is_copy:
        return False
    return ops is None or low_rank_only(ops, len(entry.shape))


def low_rank_only(ops, ndim: int) -> bool:
    """Whether ``ops`` only adds low-rank products on the tensor's own two axes (``ndim`` >= 2) or a bias
    (``ndim`` 1), from float32, bfloat16 or float16 factors read from a file or already in memory."""
    if ops.replace is not None or ops.dora_magnitude is not None or ops.row_indices is not None \
            or ops.multiply is not None:
        return False
    for d in ops.deltas:
        if not isinstance(d, (LowRank, AddScaled)):  # another adapter kind: merged with torch
            return False
        if isinstance(d, LowRank) and (d.experts or ndim < 2):
            return False
        if isinstance(d, AddScaled) and ndim != 1:
            return False
        if not all(isinstance(t, (FileTensor, MemoryTensor)) and t.dtype in FLOATS for t in _tensors(d)):
            return False
    return True


def _tensors(d):
    return (d.a, d.b) if isinstance(d, LowRank) else (d.t,)
