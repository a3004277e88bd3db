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

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ... import kernels
from ...blocks import Block, Ring
from ...buffers import HostBuffers
from ...errors import NonFiniteError
from ...kernels.args import Fp8Merge as Fp8MergeArgs
from ...kernels.args import Product
from ..floats.merge import LowRankFactors
from ..floats.spec import OPEN_SHARE, UNIT32
from .spec import (
    E4M3,
    LARGEST,
    Base,
    base_rows,
    fresh_scale,
    nearest_codes,
    scale_bytes,
)


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
        product = Product(f.left[first:last], f.right, f.rank, f.c_terms, f.slack, self.c)

        def merged(part: int, k_first: int, k_last: int) -> np.ndarray:  # blocks [k_first, k_last), open elements
            idx = buffers(f"open {part}", (n // OPEN_SHARE + 1,), np.int64)
            args = Fp8MergeArgs(codes, base.wf_arg, old, product, *band, f.left0[first:last], f.right0, f.scales,
                                self.power_of_two, self.fresh_all, k_first, k_last, v, e, state, out, chosen,
                                status).flat()
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


class Fp8Blocks:
    """Merges the FP8 tensors ``route.Fp8Route`` takes, in numpy on the CPU, whole bands of rows at a time."""

    def __init__(self, device, block_bytes: int, reader: ThreadPoolExecutor):
        self.block_bytes = block_bytes
        self.out = Ring(4, HostBuffers)  # blocks being checked and written, and the one being made
        self.decided = self.exact = 0  # elements decided outside the kernels, and of those exactly
        self.pool: ThreadPoolExecutor | None = None  # two threads share each band, made on first use

    def blocks(self, entry):
        if self.pool is None:
            self.pool = ThreadPoolExecutor(2, "lora-merge-fp8")
        merge = Fp8Merge(entry, self.pool)
        n, band = entry.shape[0], entry.base.block[0]
        step = max(band, entry.rows_per_block(self.block_bytes) // band * band)  # whole bands
        for start in range(0, n, step):
            stop = min(n, start + step)
            slot = self.out.next()
            made = merge.block(start, stop, slot.device)
            yield Block(start, stop, made, made, None, slot)
        self.decided += merge.decided
        self.exact += merge.exact

    def close(self) -> None:
        self.out.release()
        if self.pool is not None:
            self.pool.shutdown()
