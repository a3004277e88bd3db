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
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ... import kernels
from ...adapter import AddScaled
from ...blocks import Block, Ring
from ...buffers import HostBuffers
from ...exact import ExactSums
from ...reader import as_float32, stored_rows
from .spec import (
    OPEN_SHARE,
    UNIT32,
    UNIT64,
    encode,
    half_spacing,
    round_float64,
)


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


class FloatMerge:
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


class FloatBlocks:
    """Merges the tensors ``route.FloatRoute`` takes, in numpy on the CPU, block by block (``numbers.floats.merge``)."""

    def __init__(self, device, block_bytes: int, reader: ThreadPoolExecutor):
        self.block_bytes = block_bytes
        self.reader = reader
        self.scratch = HostBuffers()  # the merge's tiles
        self.raw = Ring(2, HostBuffers)  # this block, and the next one being read
        self.out = Ring(4, HostBuffers)  # blocks being checked and written, and the one being made
        self.decided = self.exact = 0  # elements decided outside the kernels, and of those exactly

    def blocks(self, entry):
        merge = FloatMerge(entry)
        n = 1 if merge.vector else entry.shape[0]
        step = n if merge.vector else entry.rows_per_block(self.block_bytes)
        spans = [(start, min(n, start + step)) for start in range(0, n, step)]
        out_dtype = np.float32 if entry.dtype == "F32" else np.uint16
        pending = self.reader.submit(self._read, entry, *spans[0]) if spans else None
        for k, (start, stop) in enumerate(spans):
            w = pending.result()
            pending = self.reader.submit(self._read, entry, *spans[k + 1]) if k + 1 < len(spans) else None
            slot = self.out.next()
            out = slot.device("out", ((stop - start) * merge.width,), out_dtype)
            merge.rows(start, stop, w, out, self.scratch)
            yield Block(start, stop, (out,), (out,), None, slot)
        self.decided += merge.flagged
        self.exact += merge.exact

    def _read(self, entry, start: int, stop: int):
        return stored_rows(entry.base, start, stop, self.raw.next().device, "raw")

    def close(self) -> None:
        self.out.release()
        self.raw.release()
