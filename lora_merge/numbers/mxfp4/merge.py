"""MXFP4 experts merged on the CPU in numpy and the MXFP4 kernels (torch is not imported), written back in their
format a block of stored rows at a time: the rows of ``<name>_blocks`` (one expert's output rows, each the input
axis in groups of 32 sharing a power-of-two scale) are contiguous bytes, so a block of them is one read and one
write, and memory stays flat however large an expert is.

In the stored orientation an expert's delta is ``left @ right`` (left: out × r, right: r × in), whichever way
round the adapter's factors fit transformers' dense (experts × in × out) view. The kernel decides each group
whose exponent the interval of its largest exact |value| decides (almost all), and each code whose error bound
is clear of a midpoint; the rest are decided here in float64 or, within float64's own error, from their exact value
(``exact``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ... import kernels
from ...blocks import Block, Ring
from ...buffers import HostBuffers
from ...errors import NonFiniteError
from ...kernels.args import Mxfp4Merge as Mxfp4MergeArgs
from ...kernels.args import Product
from ..floats.spec import OPEN_SHARE, UNIT32
from .spec import (
    E2M1,
    GROUP,
    MIDPOINTS,
    ExpertFactors,
    fresh_exponent,
    nearest_codes,
    read_rows,
    spans,
)


class Mxfp4Merge:
    """One planned MXFP4 tensor merged here, a block of stored rows at a time (``block``)."""

    def __init__(self, entry):
        self.entry, self.q = entry, entry.base
        self.experts, self.width, self.out = self.q.shape
        self.f = ExpertFactors(entry)
        unit = UNIT32
        self.c = 4 * unit
        self.c_terms = (self.f.rank + 5) * unit * (1 + (self.f.rank + 2) * unit)
        self.slack = (self.f.rank + 1) * 2.0**-126
        self.decided = self.exact = 0

    def block(self, first: int, last: int, buffers) -> tuple[np.ndarray, np.ndarray]:
        """Stored rows [first, last) of one expert merged: their block bytes and scale bytes."""
        k, o0 = divmod(first, self.out)
        rows, groups = last - first, self.width // GROUP
        left, right, left0, right0, sc = self.f.expert(k)
        blocks, scales = read_rows(self.q, first, last, buffers, "base ")
        out_blocks = buffers("blocks", (rows * self.width // 2,), np.uint8)
        out_scales = buffers("scales", (rows * groups,), np.uint8)
        status = buffers("status", (rows * groups,), np.uint8)
        n = rows * self.width
        product = Product(left[o0:o0 + rows], right, self.f.rank, self.c_terms, self.slack, self.c)
        args = Mxfp4MergeArgs(blocks, scales, product, rows, self.width, left0[o0:o0 + rows], right0, sc, out_blocks,
                              out_scales, status).flat()
        idx = buffers("open", (n // OPEN_SHARE + 1,), np.int64)
        count = kernels.MXFP4.mx_merge(*args, idx)
        if count > len(idx):
            idx = buffers("open", (n,), np.int64)
            count = kernels.MXFP4.mx_merge(*args, idx)
        nib = kernels.plain.unpack_nibbles(blocks, rows, self.width)
        codes = kernels.plain.unpack_nibbles(out_blocks, rows, self.width) if count or np.any(status == 2) else None
        if codes is not None:
            exponents = out_scales.astype(np.int64) - 127
            for g in np.flatnonzero(status == 2):
                self._group(k, o0, int(g), nib, scales, codes, out_scales)
            if count:
                self._decide(k, o0, idx[:count], nib, scales, exponents, codes)
            out_blocks[:] = kernels.plain.pack_nibbles(codes).reshape(-1)
        return out_blocks, out_scales

    def _exact_parts(self, k: int, o0: int, rows_, cols, nib, scales):
        """BASE's values, the deltas and the sizes of stored elements (rows of the block, columns), in float64."""
        _, _, left0, right0, sc = self.f.expert(k)
        groups = self.width // GROUP
        w = E2M1[nib[rows_, cols]] * np.ldexp(1.0, scales.reshape(-1, groups)[rows_, cols // GROUP].astype(np.int64)
                                             - 127)
        products = left0[o0 + rows_].astype(np.float64) * right0[cols].astype(np.float64) * sc
        return w, products.sum(axis=1), np.abs(w) + np.abs(products).sum(axis=1)

    def _values(self, k: int, o0: int, rows_, cols, nib, scales) -> list:
        """The exact values of stored elements: float64 where its bound is within float64's reach, as fractions."""
        w, delta, size = self._exact_parts(k, o0, rows_, cols, nib, scales)
        return w, w + delta, (self.f.rank + 4) * 2.0**-52 * size + 2.0**-1070

    def _group(self, k: int, o0: int, g: int, nib, scales, codes, out_scales) -> None:
        """A group the kernel left open (whether it changes, or its exponent), decided exactly."""
        groups = self.width // GROUP
        i, gg = divmod(g, groups)
        cols = np.arange(gg * GROUP, (gg + 1) * GROUP)
        rows_ = np.full(GROUP, i)
        w, v, bound = self._values(k, o0, rows_, cols, nib, scales)
        if not np.isfinite(v).all():
            raise NonFiniteError(f"the merge gives NaN or Inf in {self.entry.name}, which MXFP4 cannot store",
                                 "merge with --dtype to write a dequantized checkpoint, or repair the adapter")
        self.decided += GROUP
        self.exact += GROUP
        sums, flat = self.f.sums(k, o0), i * self.width + cols
        if not np.any(sums(flat, np.zeros(GROUP)) != 0):  # nothing changes: BASE's bytes
            codes[i, cols] = nib[i, cols]
            out_scales[g] = scales[g]
            return
        x = sums(flat, w)  # rounded to odd: its largest |value| and its codes are the exact value's
        ex = fresh_exponent(float(np.max(np.abs(x))))
        out_scales[g] = ex + 127
        codes[i, cols] = nearest_codes(np.ldexp(x, -ex))

    def _decide(self, k: int, o0: int, flat, nib, scales, exponents, codes) -> None:
        """The open codes of merged groups: their exact value / the scale rounded to the nearest code."""
        self.decided += len(flat)
        groups = self.width // GROUP
        rows_, cols = flat // self.width, flat % self.width
        w, v, bound = self._values(k, o0, rows_, cols, nib, scales)
        if not np.isfinite(v).all():
            raise NonFiniteError(f"the merge gives NaN or Inf in {self.entry.name}, which MXFP4 cannot store",
                                 "merge with --dtype to write a dequantized checkpoint, or repair the adapter")
        ex = exponents.reshape(-1, groups)[rows_, cols // GROUP]
        t, tb = np.ldexp(v, -ex), np.ldexp(bound, -ex) + 2.0**-52 * np.abs(np.ldexp(v, -ex))
        near, _ = kernels.plain.e2m1_nearest(t, tb)
        distance = np.min(np.abs(np.abs(t)[:, None] - np.array(MIDPOINTS)), axis=1)
        clear = distance > tb
        codes[rows_[clear], cols[clear]] = near[clear]
        close = np.flatnonzero(~clear)
        if len(close):  # within float64's own error of a midpoint: the exact value decides
            self.exact += len(close)
            x = self.f.sums(k, o0)(flat[close], w[close])
            codes[rows_[close], cols[close]] = np.where(x == 0, np.where(np.signbit(v[close]), 8, 0),
                                                        nearest_codes(np.ldexp(x, -ex[close])))


class Mxfp4Blocks:
    """Merges the MXFP4 experts ``route.Mxfp4Route`` takes, in numpy on the CPU, a block of stored rows at a
    time: a Block's start and stop count stored rows (expert-major), not experts."""

    def __init__(self, device, block_bytes: int, reader: ThreadPoolExecutor):
        self.out = Ring(4, HostBuffers)
        self.decided = self.exact = 0

    def blocks(self, entry):
        merge = Mxfp4Merge(entry)
        for first, last in spans(entry.base):
            slot = self.out.next()
            made = merge.block(first, last, slot.device)
            yield Block(first, last, made, made, None, slot)
        self.decided += merge.decided
        self.exact += merge.exact

    def close(self) -> None:
        self.out.release()
