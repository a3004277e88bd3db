"""FP8 weights with block scales merged on the CPU in numpy and the FP8 kernels (torch is not imported), written back
in their format: a band of rows (one row of scale blocks) at a time.

For each band the kernel computes every merged value in float32 with a rigorous bound on its error, and for each
block the interval that holds its largest exact |value|, and whether the adapter changes it at all. A block the
adapter does not change keeps BASE's codes and scale. A changed block gets the scale the format defines for its
largest exact |value| (``Fp8Tensor.fresh_scales``: that value / 448 rounded to float32, or the smallest power of two
at least it), decided here exactly where the interval leaves it open; then each element the nearest e4m3 code to
its exact value / the scale, ties to even, 448 at most: the kernel's where its bound is clear of a midpoint, else
decided here in float64 or, within float64's own error, from the exact value (``exact``). So the bytes are those of
the exact merge, rounded once, whatever order the products were summed in.

A float BASE written as FP8 (``--quantize fp8``, ``Fp8Quantized``) goes the same way, its values read as float32
(exact copies of bfloat16, float16 or float32) in place of codes times scales, and every block scaled afresh,
whether the adapter changes it or not (or targets the matrix at all).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from .. import kernels
from ..dense import (
    OPEN_SHARE,
    UNIT32,
    LowRankFactors,
    low_rank_only,
    round_fraction,
    stored_rows,
)
from ..errors import NonFiniteError
from ..safetensors_file import pread_into

LARGEST = 448.0  # e4m3's largest value
SCALE_DTYPES = ("F32", "F8_E8M0")
SOURCE_DTYPES = ("BF16", "F16", "F32")  # a float BASE written as FP8: exact in float32
NO_VALUES = np.zeros(0, np.float32)
BAND_ELEMENTS = 1 << 22  # a band is merged whole: larger ones (a scale per tensor, say) go through the torch codec


E4M3 = kernels.plain.E4M3  # each code's value (float64; NaN for 0x7F and 0xFF)


def fast(entry, device_type: str) -> bool:
    """Whether ``entry`` is merged here: an FP8 matrix written back as FP8 on the CPU, with a grid of float32 or
    power-of-two scales, changed by low-rank products only; or a float matrix of BASE written as FP8
    (``--quantize fp8``), changed so or not at all."""
    from .fp8 import Fp8Quantized, Fp8Tensor

    q = entry.base
    if device_type != "cpu" or not entry.requantized or not isinstance(q, Fp8Tensor):
        return False
    quantize = isinstance(q, Fp8Quantized) and q.source.dtype in SOURCE_DTYPES
    if q.origin != "fp8" and not quantize:
        return False
    if q.stacked or len(q.parts[1].shape) != 2 or q.parts[1].dtype not in SCALE_DTYPES or q.parts[0].dtype != "F8_E4M3":
        return False
    if q.block[0] * q.shape[1] > BAND_ELEMENTS:
        return False
    return (entry.ops is None and quantize) or entry.ops is not None and low_rank_only(entry.ops, 2)


def base_rows(q, start: int, stop: int, buffers, name: str) -> Base:
    """BASE's dense rows [start, stop): its codes and rows of scales as stored, or a float BASE's values (float32,
    exact copies) for ``--quantize``."""
    if getattr(q, "source", None) is None:  # an FP8 BASE
        codes, raw = read_parts(q, start, stop, buffers, name)
        return Base(codes, scale_rows(q, raw), None)
    info, cols = q.source, q.shape[1]
    wf = kernels.plain.load(kernels.KINDS[info.dtype], stored_rows(info, start, stop, buffers, f"{name}values"))
    bands = -(-(stop - start) // q.block[0])
    unused = buffers(f"{name}no codes", ((stop - start) * cols,), np.uint8)  # the kernels read wf instead
    return Base(unused.reshape(stop - start, cols), np.ones((bands, -(-cols // q.block[1])), np.float32),
                wf.reshape(stop - start, cols))


@dataclass(frozen=True)
class Base:
    """BASE's rows as the FP8 kernels take them: codes and scales (an FP8 BASE), or float32 values ``wf``."""

    codes: np.ndarray  # rows × cols
    scales: np.ndarray  # bands × column blocks
    wf: np.ndarray | None = None  # rows × cols

    def band(self, k: int, rows: slice) -> Base:
        return Base(self.codes[rows], self.scales[k], None if self.wf is None else self.wf[rows])

    def values(self, flat: np.ndarray, bn: int) -> np.ndarray:
        """The float64 values of a band's flat indices (exact)."""
        if self.wf is not None:
            return self.wf.reshape(-1)[flat].astype(np.float64)
        return E4M3[self.codes.reshape(-1)[flat]] * self.scales[(flat % self.codes.shape[1]) // bn].astype(np.float64)

    @property
    def wf_arg(self):
        """``wf`` as the kernels take it: empty for an FP8 BASE."""
        return self.wf if self.wf is not None else NO_VALUES


def read_parts(q, start: int, stop: int, buffers, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Dense rows [start, stop) as stored: their codes (uint8, rows × cols) and the bytes of their rows of
    scales."""
    codes_info, scale_info = q.parts
    cols = q.shape[1]
    first, last = q.part_rows(1, start, stop)
    codes = buffers(f"{name}codes", ((stop - start) * cols,), np.uint8)
    raw = buffers(f"{name}scales", ((last - first) * scale_info.row_bytes,), np.uint8)
    fd = os.open(codes_info.path, os.O_RDONLY)
    try:
        pread_into(fd, memoryview(codes), codes_info.start + start * cols)
    finally:
        os.close(fd)
    fd = os.open(scale_info.path, os.O_RDONLY)
    try:
        pread_into(fd, memoryview(raw), scale_info.start + first * scale_info.row_bytes)
    finally:
        os.close(fd)
    return codes.reshape(stop - start, cols), raw


def scale_rows(q, raw: np.ndarray) -> np.ndarray:
    """Rows of stored scales (bytes) as float32 values, one row of column blocks each."""
    return scale_values(raw.reshape(-1).view(np.uint8), q.parts[1].dtype).reshape(-1, -(-q.shape[1] // q.block[1]))


def scale_values(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored scales as float32 values: float32 as they are, e8m0 bytes as 2^(byte - 127)."""
    if dtype == "F32":
        return raw.view(np.float32)
    return np.ldexp(np.float32(1), raw.astype(np.int32) - 127).astype(np.float32)


def scale_bytes(values: np.ndarray, dtype: str) -> np.ndarray:
    """Scales (float32 values) as stored: float32, or e8m0 exponent bytes."""
    if dtype == "F32":
        return np.ascontiguousarray(values, np.float32).view(np.uint8)
    return (np.frexp(values.astype(np.float64))[1] - 1 + 127).astype(np.uint8)


def fresh_scale(largest, power_of_two: bool) -> float:
    """The scale FP8 defines for a block whose largest |value| is ``largest`` (a float or an exact Fraction)."""
    if largest == 0:
        return 1.0  # an all-zero block: any scale; 1, as transformers uses
    q = Fraction(largest) / Fraction(LARGEST)
    if power_of_two:  # the smallest power of two at least q
        e = q.numerator.bit_length() - q.denominator.bit_length()
        while Fraction(2) ** e < q:
            e += 1
        while Fraction(2) ** (e - 1) >= q:
            e -= 1
        return math.ldexp(1.0, e)
    return round_fraction(q, "F32")


def fresh_scales(largest: np.ndarray, power_of_two: bool) -> np.ndarray:
    """``fresh_scale`` of each of the float64 ``largest`` (where it is computed through float64 rather than exactly:
    the caller widens what it asks for so that a rounding there cannot matter)."""
    with np.errstate(all="ignore"):
        q = largest / LARGEST
        if power_of_two:
            m, e = np.frexp(q)  # q = m 2^e, m in [0.5, 1): the smallest power of two at least q
            scales = np.ldexp(1.0, np.where(m == 0.5, e - 1, e))
        else:
            scales = q.astype(np.float32).astype(np.float64)
    return np.where(largest > 0, scales, 1.0)


MAGNITUDES = E4M3[:127]  # e4m3's magnitudes, increasing (codes 0 to 0x7E)
MIDPOINTS = (MAGNITUDES[1:] + MAGNITUDES[:-1]) / 2  # exact, as is each one times a float32 scale


def nearest_codes(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The e4m3 code nearest each x / s, exactly (doubles x, float32 scales s), ties to even, past 448 the largest:
    x is compared with each midpoint times its scale, itself a double."""
    a = np.abs(x)
    k = np.searchsorted(MIDPOINTS, a / s)  # the midpoints below a / s, off by one at most where it is rounded
    last = len(MIDPOINTS) - 1
    k -= (k > 0) & (a <= MIDPOINTS[np.maximum(k - 1, 0)] * s)
    k += (k <= last) & (a > MIDPOINTS[np.minimum(k, last)] * s)
    k += (k <= last) & (a == MIDPOINTS[np.minimum(k, last)] * s) & (k % 2 == 1)  # a tie: to the even code
    return (k | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


class Fp8Merge:
    """One planned FP8 tensor merged here, band by band (``band``)."""

    def __init__(self, entry, pool=None):
        self.entry, self.q = entry, entry.base
        self.pool = pool if kernels.FP8 is not kernels.plain.FP8 else None  # threads to share a band with
        self.f = LowRankFactors(entry, wide=False)
        self.cols = entry.shape[1]
        self.bm, self.bn = self.q.block
        self.scale_dtype = self.q.parts[1].dtype
        self.power_of_two = self.q.power_of_two or self.scale_dtype == "F8_E8M0"
        self.fresh_all = not self.q.stored_as_is  # --quantize: every block scaled afresh, changed or not
        # w = code × scale is rounded once more than the dense merge's w: one more u for |w| and |v|
        self.c = UNIT32 * 4
        self.decided = self.exact = 0  # elements decided here, and of those exactly, for the record

    def block(self, start: int, stop: int, buffers) -> tuple[np.ndarray, np.ndarray]:
        """Dense rows [start, stop) (whole bands, or the tensor's last rows) merged: their codes and their rows of
        scales as stored."""
        base = base_rows(self.q, start, stop, buffers, "base ")
        out = buffers("codes", base.codes.shape, np.uint8)
        new = buffers("new scales", base.scales.shape, np.float32)
        for k, first in enumerate(range(start, stop, self.bm)):
            last = min(stop, first + self.bm)
            band = slice(first - start, last - start)
            new[k] = self._band(first, last, base.band(k, band), out[band], buffers)
        return out.reshape(-1), scale_bytes(new, self.scale_dtype)

    def _band(self, first: int, last: int, base: Base, out, buffers) -> np.ndarray:
        f, rows, n = self.f, last - first, (last - first) * self.cols
        codes, old = base.codes, base.scales
        nscale = len(old)
        v, e, state = buffers("v", (n,), np.float32), buffers("e", (n,), np.float32), buffers("state", (n,), np.uint8)
        chosen, status = np.empty(nscale, np.float32), np.empty(nscale, np.uint8)
        band = (rows, self.cols, self.bn)

        def merged(part: int, k_first: int, k_last: int) -> np.ndarray:  # blocks [k_first, k_last), open elements
            idx = buffers(f"open {part}", (n // OPEN_SHARE + 1,), np.int64)
            args = (codes, base.wf_arg, old, f.left[first:last], f.right, f.rank, f.c_terms, f.slack, self.c, *band,
                    f.left0[first:last], f.right0, f.scales, self.power_of_two, self.fresh_all, k_first, k_last, v, e,
                    state, out, chosen, status)
            count = kernels.FP8.fp8_merge(*args, idx)
            if count > len(idx):  # more open elements than room for them: the blocks again, with room for all (the
                idx = buffers(f"open {part}", (n,), np.int64)  # kernel keeps v and e only of the blocks it leaves)
                count = kernels.FP8.fp8_merge(*args, idx)
            return idx[:count].copy()

        if self.pool is not None and nscale > 1:  # the band's blocks in two halves, side by side (no GIL held)
            half = nscale // 2
            flagged = [future.result() for future in [self.pool.submit(merged, 0, 0, half),
                                                      self.pool.submit(merged, 1, half, nscale)]]
        else:
            flagged = [merged(0, 0, nscale)]
        left = np.flatnonzero(status == 2)  # blocks whose change or scale the kernel could not tell
        if len(left):
            keep = np.full(nscale, 2, np.uint8)
            for k in left:
                if self.fresh_all or self._changes(first, k, base, state):
                    keep[k], chosen[k] = 0, self._scale(first, k, base, v, e)
                else:
                    keep[k], chosen[k] = 1, old[k]
            idx = buffers("open 0", (n,), np.int64)
            count = kernels.FP8.fp8_encode(v, e, chosen, keep, codes, *band, out, idx)
            flagged.append(idx[:count].copy())
        flat = np.concatenate(flagged)
        if len(flat):
            self._decide(flat, first, base, chosen, out.reshape(-1))
        return chosen

    # ------------------------------------------------------------------ what the kernel leaves open

    def _exact_parts(self, flat: np.ndarray, first: int, base: Base) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """BASE's values, the deltas and the sizes of flat indices of a band, in float64 (each product of two
        float32 factors is exact there, so the sum is within (r + 1) ulp of the exact delta)."""
        f = self.f
        i, j = flat // self.cols, flat % self.cols
        w = base.values(flat, self.bn)
        products = f.left0[first + i].astype(np.float64) * f.right0[j].astype(np.float64) * f.scales
        return w, products.sum(axis=1), np.abs(w) + np.abs(products).sum(axis=1)

    def _block(self, rows: int, k: int) -> np.ndarray:
        """The flat indices of block k's elements in a band of ``rows`` rows."""
        cols = np.arange(k * self.bn, min(self.cols, (k + 1) * self.bn))
        return (np.arange(rows)[:, None] * self.cols + cols).reshape(-1)

    def _changes(self, first: int, k: int, base: Base, state) -> bool:
        """Whether the adapter changes any element of block k of the band at all (the kernel could not tell)."""
        flat = self._block(len(base.codes), k)
        if np.any(state[flat] == 2):
            return True
        flat = flat[state[flat] == 1]
        w, delta, size = self._exact_parts(flat, first, base)
        if np.any(np.abs(delta) > (self.f.rank + 2) * 2.0**-52 * (size - np.abs(w))):
            return True
        return bool(np.any(self.f.sums(first, self.cols)(flat, np.zeros(len(flat))) != 0))  # a delta of exactly 0?

    def _scale(self, first: int, k: int, base: Base, v, e) -> float:
        """Block k's fresh scale from its largest exact |value| itself, where the kernel's interval for it holds a
        rounding boundary of the scale (or reaches zero)."""
        flat = self._block(len(base.codes), k)
        lo = float(np.max(np.abs(v[flat]) - e[flat])) * (1 - 2.0**-22)
        flat = flat[np.abs(v[flat]) + e[flat] >= lo]  # the elements that can be the largest
        self.decided += len(flat)
        w, delta, size = self._exact_parts(flat, first, base)  # in float64, with a bound of its own
        a, bound = np.abs(w + delta), (self.f.rank + 4) * 2.0**-52 * size + 2.0**-1070
        lo64, hi64 = float(np.max(a - bound)), float(np.max(a + bound))
        low, high = fresh_scale(max(lo64, 0.0), self.power_of_two), fresh_scale(hi64, self.power_of_two)
        if low == high:
            return low
        flat = flat[a + bound >= lo64]
        w = base.values(flat, self.bn)
        self.exact += len(flat)
        largest = np.max(np.abs(self.f.sums(first, self.cols)(flat, w)))  # rounded to odd, as is the largest |value|
        return fresh_scale(float(largest), self.power_of_two)

    def _decide(self, flat: np.ndarray, first: int, base: Base, chosen, out) -> None:
        """The open elements' codes: their exact value / the scale rounded to the nearest code, in float64 where
        its error bound keeps clear of a midpoint, else from the exact value."""
        self.decided += len(flat)
        w, delta, size = self._exact_parts(flat, first, base)
        with np.errstate(all="ignore"):
            v = w + delta
            if not np.isfinite(v).all():
                raise NonFiniteError(f"the merge gives NaN or Inf in {self.entry.name}, which F8_E4M3 cannot store",
                                     "merge with --dtype to write a dequantized checkpoint, or repair the adapter")
            s = chosen[(flat % self.cols) // self.bn].astype(np.float64)
            t = v / s
            bound = ((self.f.rank + 4) * 2.0**-52 * size + 2.0**-1070) / s + 2.0**-52 * np.abs(t)
            a = np.abs(t)
            step = np.ldexp(1.0, np.maximum(np.frexp(a)[1] - 1, -6) - 3)
            step = np.where(a == 0, 2.0**-9, step)
            q = np.minimum(np.round(a / step) * step, LARGEST)  # np.round: half to even
            mid = (np.floor(a / step) + 0.5) * step
            clear = (np.abs(a - mid) > bound) | (a - bound > 432.0)
        negative = np.signbit(t)
        codes_clear = np.searchsorted(E4M3[:127], q) | np.where(negative, 0x80, 0)
        out[flat[clear]] = codes_clear[clear].astype(np.uint8)
        close = np.flatnonzero(~clear)
        if len(close):  # within float64's own error of a midpoint: the exact value decides
            self.exact += len(close)
            at = flat[close]
            x = self.f.sums(first, self.cols)(at, w[close])
            out[at] = np.where(x == 0, np.where(negative[close], 0x80, 0), nearest_codes(x, s[close]))  # 0: v's sign
