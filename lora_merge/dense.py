"""The merge of a tensor of a float dtype on the CPU, in numpy (torch is not imported): BASE's rows plus the
adapter's low-rank products (and LoRA's bias), each element rounded once to the nearest value of the output dtype.

``kernels`` computes each element's low-rank product ``L @ R`` (the scale folded into L) in float32 (float64 for a
float32 output), adds BASE's element, rounds the sum and proves from a rigorous bound on that arithmetic's error
that the result is the nearest value to the exact W + s·B·A. The few elements it cannot prove
(those whose bound reaches a rounding midpoint) are decided here: in float64 with its own error bound, and where
even that is too close to call, from their exact value (``exact``). So the bytes are those of the exact value
rounded once, whichever path computed them and in whatever order BLAS summed.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np

from . import kernels
from .adapter import AddScaled, FileTensor, LowRank, MemoryTensor
from .exact import ExactSums
from .safetensors_file import TensorInfo, pread_into

FLOATS = ("BF16", "F16", "F32")
UNIT32, UNIT64 = 2.0**-24, 2.0**-53  # unit roundoff of float32 and float64
OPEN_SHARE = 16  # room for 1 in 16 elements left open by the kernels (typically 1 in 500 are)
# mantissa bits, smallest normal exponent and largest exponent of each output dtype
FORMATS = {"BF16": (7, -126, 127), "F16": (10, -14, 15), "F32": (23, -126, 127)}


def is_dense(entry, device_type: str) -> bool:
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
    if ops.replace is not None or ops.dora_magnitude is not None or ops.row_indices is not None:
        return False
    for d in ops.deltas:
        if isinstance(d, LowRank) and (d.experts or ndim < 2):
            return False
        if isinstance(d, AddScaled) and ndim != 1:
            return False
        if not all(isinstance(t, (FileTensor, MemoryTensor)) and t.dtype in FLOATS for t in _tensors(d)):
            return False
    return True


def _tensors(d):
    return (d.a, d.b) if isinstance(d, LowRank) else (d.t,)


def raw_bytes(t) -> np.ndarray:
    """An adapter tensor as stored (read from its file, or the bytes of one already in memory), as uint8."""
    if isinstance(t, MemoryTensor):
        import torch

        return t.tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    info = t.info
    raw = np.empty(info.nbytes, np.uint8)
    if info.nbytes:
        fd = os.open(info.path, os.O_RDONLY)
        try:
            pread_into(fd, memoryview(raw), info.start)
        finally:
            os.close(fd)
    return raw


def stored_rows(info: TensorInfo, start: int, stop: int, buffers, name: str) -> np.ndarray:
    """Rows [start, stop) of a stored float tensor (a vector or scalar: all of it) as its elements' bits, uint16 or
    float32, in ``buffers``' buffer ``name``."""
    row = info.row_bytes if len(info.shape) > 1 else info.nbytes
    raw = buffers(name, ((stop - start) * row,), np.uint8)
    fd = os.open(info.path, os.O_RDONLY)
    try:
        pread_into(fd, memoryview(raw), info.start + row * start)
    finally:
        os.close(fd)
    return raw.view(np.float32 if info.dtype == "F32" else np.uint16)


def as_float32(t) -> np.ndarray:
    """An adapter tensor's values as float32 (exactly: it is stored as float32, bfloat16 or float16)."""
    if isinstance(t, MemoryTensor):
        return t.tensor.float().numpy()
    raw = raw_bytes(t)
    return kernels.plain.load(kernels.KINDS[t.dtype], raw.view(np.float32 if t.dtype == "F32" else np.uint16)
                              ).reshape(t.shape)


def low_rank_terms(entry) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Each delta of the entry as (left, right, scale) on the stored tensor seen as rows × width: the delta is
    scale · left @ right, left (rows × r) and right (r × width) float32 (exact copies of the adapter's factors)."""
    rows = entry.shape[0]
    width = math.prod(entry.shape[1:]) if len(entry.shape) > 1 else entry.shape[0]
    terms = []
    for d in entry.ops.deltas if entry.ops is not None else ():
        if isinstance(d, AddScaled):  # a bias: one row, a rank-one "product" 1 · t
            terms.append((np.ones((1, 1), np.float32), as_float32(d.t).reshape(1, -1), d.scale))
            continue
        a, b = as_float32(d.a), as_float32(d.b)
        a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        if d.transposed:  # the stored tensor is (in × out): its rows are columns of B·A
            terms.append((np.ascontiguousarray(a2.T), np.ascontiguousarray(b2.T), d.scale))
        else:
            terms.append((b2, a2, d.scale))
    if len(entry.shape) == 1:
        rows, width = 1, entry.shape[0]
    assert all(left.shape[0] == rows and right.shape[1] == width for left, right, _ in terms)
    return terms


class LowRankFactors:
    """The merge's factors of one planned tensor: every delta side by side as ``left @ right`` on the stored tensor
    seen as rows × width, the scale folded into ``left`` (rounded once: the bound counts it), ``right`` packed for
    the kernels, in float32 (float64 where ``wide``); and the adapter's own factors (exact float32) with each
    column's scale, for the exact value where the kernels leave an element open."""

    def __init__(self, entry, wide: bool):
        self.vector = len(entry.shape) == 1  # a bias: merged as one row
        self.width = entry.shape[0] if self.vector else math.prod(entry.shape[1:])
        self.terms = low_rank_terms(entry)
        self.rank = sum(left.shape[1] for left, _, _ in self.terms)
        compute = np.float64 if wide else np.float32
        rows = 1 if self.vector else entry.shape[0]
        self.left = np.concatenate([left.astype(np.float64) * s for left, _, s in self.terms], axis=1).astype(compute) \
            if self.terms else np.zeros((rows, 0), compute)
        right = np.concatenate([right for _, right, _ in self.terms], axis=0) if self.terms \
            else np.zeros((0, self.width), np.float32)
        self.right = kernels.pack(right.astype(compute))
        self.left0 = np.ascontiguousarray(np.concatenate([left for left, _, _ in self.terms], axis=1)) \
            if self.terms else np.zeros((rows, 0), np.float32)
        self.right0 = np.ascontiguousarray(right.T)  # width × r: one element's factors side by side
        self.scales = np.concatenate([np.full(left.shape[1], s) for left, _, s in self.terms]) if self.terms \
            else np.zeros(0)
        unit = UNIT64 if wide else UNIT32
        # |fl(W + fl(L @ R)) - (W + s·B·A)| <= u(1 + u) |y| (the one rounding of the sum) + (r + 1) u Σ|L||R| (the
        # product, in any summation order) + u Σ|L||R| (the scale's rounding): c = 3u for |y|, (r + 5) u for the
        # product's terms (their sum computed as the product is: within (r + 1) u of itself) leave room for the
        # bound's own rounding; and a share for float32 underflow in the products (a flushed subnormal each)
        self.c = 3 * unit if self.terms else 0.0
        self.c_terms = (self.rank + 5) * unit * (1 + (self.rank + 2) * unit)
        self.slack = (self.rank + 1) * (2.0**-1022 if wide else 2.0**-126) if self.terms else 0.0

    def sums(self, first: int, width: int) -> ExactSums:
        """The exact values of the rows from ``first`` on (a block's flat indices)."""
        return ExactSums(self.left0[first:], self.right0, self.scales, width)

    def untouched(self, i: int, j: int) -> bool:
        """Whether no delta has a term at (i, j): then the merge keeps BASE's bits (-0 included)."""
        return all(not np.any(left[i]) or not np.any(right[:, j]) for left, right, _ in self.terms)


class DenseMerge:
    """One planned tensor merged here, a block of rows at a time (``rows``)."""

    def __init__(self, entry):
        self.entry = entry
        self.wide = entry.dtype == "F32"  # a float32 output is computed in float64
        self.kind, self.in_kind = kernels.KINDS[entry.dtype], kernels.KINDS[entry.base.dtype]
        self.f = LowRankFactors(entry, self.wide)
        self.vector, self.width = self.f.vector, self.f.width
        self.flagged = self.exact = 0  # elements decided outside the kernels, and of those exactly, for the record

    def rows(self, start: int, stop: int, w: np.ndarray, out: np.ndarray, scratch) -> None:
        """Rows [start, stop): ``w`` BASE's elements as stored (a flat array of their dtype), ``out`` the output's
        (uint16 for 16-bit dtypes, float32), both rows × width; ``scratch(name, shape, dtype)`` reused buffers. The
        elements the kernels leave open are decided together afterwards."""
        if self.vector:
            start, stop = 0, 1
        n = (stop - start) * self.width
        f = self.f
        left = f.left[start:stop]
        bound = (f.rank, f.c_terms, f.slack, stop - start, self.width, f.c)
        for passes in (kernels, kernels.plain):  # the plain passes list every open element, however many
            idx = scratch("flagged", (n // OPEN_SHARE + 1 if passes is kernels else n,), np.int64)
            if self.wide:
                count = passes.merge32(w, self.in_kind, left, f.right, *bound, out, idx)
            else:
                count = passes.merge16(self.kind, w, self.in_kind, left, f.right, *bound, out, idx)
            if count <= len(idx):
                break
        if count:
            self._decide(idx[:count], start, w, out)

    def _decide(self, flat: np.ndarray, t0: int, w: np.ndarray, out: np.ndarray) -> None:
        """The open elements of a block (flat indices in it), each the exact value rounded once: in float64 where
        its error bound keeps clear of a midpoint, else from the exact value."""
        self.flagged += len(flat)
        n = len(flat)
        w64, delta, size = np.empty(n), np.empty(n), np.empty(n)
        f = self.f
        kernels.gather(flat, w, self.in_kind, f.left0[t0:], f.right0, f.scales, self.width, w64, delta, size)
        v = kernels.plain.add(w64, delta)
        bound = (f.rank + 4) * 2.0**-52 * size + 2.0**-1070
        nearest = round_float64(v, self.entry.dtype)
        with np.errstate(invalid="ignore"):
            close = np.flatnonzero(~(np.abs(v - nearest) + bound < half_spacing(nearest, v, self.entry.dtype))
                                   & np.isfinite(v))
        if len(close):  # within float64's own error of a midpoint: the exact value decides
            nearest[close] = self._exactly(flat[close], t0, w64[close])
        out[flat] = encode(nearest, self.entry.dtype)

    def _exactly(self, flat: np.ndarray, t0: int, w: np.ndarray) -> np.ndarray:
        self.exact += len(flat)
        x = self.f.sums(t0, self.width)(flat, w)
        y = round_float64(x, self.entry.dtype)
        for k in np.flatnonzero(x == 0):  # exactly zero: BASE's bits (-0 too) where no delta has a term there
            y[k] = w[k] if self.f.untouched(int(flat[k] // self.width) + t0, int(flat[k] % self.width)) else 0.0
        return y


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
