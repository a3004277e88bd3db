"""The check of an FP8 tensor written back in its format on the CPU (see ``merge.py`` beside it), with code of its
own.

It reads BASE's codes and scales itself (a float BASE's values, for ``--quantize fp8``), prepares the adapter's
factors its own way (``floats.check.own_terms``: the scale folded into the right factor), and asks the FP8 kernel
whether each stored value is, beyond the arithmetic's rigorous bound, within half a step of the e4m3 grid at its
scale of the exact W + s·B·A (then it is the nearest code). Those it cannot prove so are measured in float64 against the
same bound as ``grid.GridCheck``'s: half a step at the exact value, and for another tool's float32 merge, float32's
error in the delta. Each block whose stored values are not exactly the merged ones must carry the scale the format
defines for its largest |value|.
"""

from __future__ import annotations

import numpy as np

from ... import kernels
from ...buffers import HostBuffers
from ...check.verdict import (
    HALF,
    NOISE,
    SCALE_TOLERANCE,
    SUMS,
    QuantizedTally,
    largest,
)
from ...kernels.args import Fp8Check as Fp8CheckArgs
from ...kernels.args import Product
from ..floats.check import COMPUTE_UNIT, own_terms
from ..floats.spec import OPEN_SHARE
from .spec import E4M3, Base, base_rows, fresh_scale, fresh_scales, scale_rows


class Fp8Check(QuantizedTally):
    """Every element and every scale of one FP8 tensor as stored: feed it the stored parts a band of rows at a time
    or more (``block``), then read ``result()``."""

    def __init__(self, entry, buffers: HostBuffers | None = None):
        self.e, self.q = entry, entry.base
        self.buffers = buffers or HostBuffers()
        self.cols = entry.shape[1]
        self.bm, self.bn = self.q.block
        self.power_of_two = self.q.power_of_two or self.q.parts[1].dtype == "F8_E8M0"
        # the adapter's factors side by side (none: a float BASE's matrix written as FP8, unchanged)
        self.terms = own_terms(entry) or [(np.zeros((entry.shape[0], 0), np.float32),
                                           np.zeros((0, self.cols), np.float32), 0.0)]
        self.rank = sum(left.shape[1] for left, _, _ in self.terms)
        self.left = np.concatenate([left for left, _, _ in self.terms], axis=1).astype(np.float32)
        right = np.concatenate([right.astype(np.float64) * s for _, right, s in self.terms]).astype(np.float32)
        self.right = kernels.pack(right)
        self.right0 = np.ascontiguousarray(np.concatenate([right for _, right, _ in self.terms]).T)
        self.scales = np.concatenate([np.full(right.shape[0], s) for _, right, s in self.terms])
        # w and the stored values are exact in float64, v = w + q rounded once there: 2^-52 for |v|; the product's
        # terms as the dense check's, with float32 underflow's share
        self.c = 2.0**-52
        self.c_terms = (self.rank + 6) * COMPUTE_UNIT * (1 + (self.rank + 2) * COMPUTE_UNIT)
        self.slack = (self.rank + 1) * 2.0**-126
        super().__init__(self.q.description)

    def block(self, start: int, stop: int, stored) -> None:
        """Check dense rows [start, stop) (whole bands, or the tensor's last rows) from their stored codes and rows of
        scales (bytes as written)."""
        codes = np.asarray(stored[0]).reshape(-1).view(np.uint8).reshape(stop - start, self.cols)
        scales = scale_rows(self.q, np.asarray(stored[1]))
        self.finite = self.finite and not bool(np.any((codes & 0x7F) == 0x7F))
        base = base_rows(self.q, start, stop, self.buffers, "check ")
        for k, first in enumerate(range(start, stop, self.bm)):
            last = min(stop, first + self.bm)
            band = slice(first - start, last - start)
            self._band(first, last, base.band(k, band), codes[band], scales[k])

    def _band(self, first: int, last: int, base: Base, codes, scales) -> None:
        rows, n = last - first, (last - first) * self.cols
        nscale = len(scales)
        blocks, sums = np.zeros((nscale, 3)), np.zeros(SUMS)
        idx = self.buffers("flagged", (n // OPEN_SHARE + 1,), np.int64)
        product = Product(self.left[first:last], self.right, self.rank, self.c_terms, self.slack, self.c)
        args = Fp8CheckArgs(base.codes, base.scales, base.wf_arg, codes, scales, product, rows, self.cols,
                            self.bn).flat()
        count = kernels.FP8.fp8_check(*args, idx, sums, blocks)
        if count > len(idx):
            idx, sums, blocks = self.buffers("flagged", (count,), np.int64), np.zeros(SUMS), np.zeros((nscale, 3))
            count = kernels.FP8.fp8_check(*args, idx, sums, blocks)
        self.sums += sums
        self.elements += n
        if count < n:  # within half a step of the nearest grid value
            self.worst = max(self.worst, HALF)
        if count:
            self._measure(idx[:count], first, base, codes, scales)
        self._scales(first, blocks, scales)

    def _measure(self, flat, first: int, base: Base, codes, scales) -> None:
        i, j = flat // self.cols, flat % self.cols
        w = base.values(flat, self.bn)
        products = self.left[first + i].astype(np.float64) * self.right0[j].astype(np.float64) * self.scales
        exact = w + products.sum(axis=1)
        scale = scales[j // self.bn].astype(np.float64)
        got = E4M3[codes.reshape(-1)[flat]] * scale
        with np.errstate(all="ignore"):
            error = np.abs(got - exact)
            a = np.abs(exact) / scale  # the step of the grid at the exact value, beyond 448 the one below it
            power = np.ldexp(1.0, np.clip(np.frexp(a)[1] - 1, -6, 8))
            spacing = power * 2.0**-3 * scale
            bound = np.abs(exact) * NOISE + HALF * spacing
            bad = ~(error <= bound)
            # another tool's float32 merge may round the other way near a halfway point
            bound = np.where(bad, bound + np.abs(products).sum(axis=1) * ((self.rank + 2) * COMPUTE_UNIT + NOISE),
                             bound)
            bad = ~(error <= bound)
            self.worst = max(self.worst, largest(error / spacing))
            self.worst_of_bound = max(self.worst_of_bound, largest(error / bound))
        count = int(bad.sum())
        if count:
            self.failed += count
            if self.first is None:
                k = int(np.flatnonzero(bad)[0])
                self.first = {"index": [int(first + i[k]), int(j[k])], "value": float(got[k]),
                              "expected": float(exact[k]), "bound": float(bound[k])}

    def _scales(self, first: int, blocks, scales) -> None:
        """Each block whose stored values differ from the exact ones must have the scale the format defines for the
        largest |value|, which lies in [lo, hi]."""
        lo, hi, differs = blocks.T
        low = fresh_scales(lo * (1 - NOISE), self.power_of_two) * (1 - SCALE_TOLERANCE)
        high = fresh_scales(hi * (1 + NOISE), self.power_of_two) * (1 + SCALE_TOLERANCE)
        s = scales.astype(np.float64)
        wrong = (differs > 0) & ~((low <= s) & (s <= high))
        self.blocks += len(blocks)
        self.exact_blocks += int(np.count_nonzero(differs == 0))
        count = int(np.count_nonzero(wrong))
        if count:
            self.bad_scales += count
            if self.first_bad_scale is None:
                k = int(np.flatnonzero(wrong)[0])
                self.first_bad_scale = {"block": [first // self.bm, k], "scale": float(s[k]),
                                        "expected": fresh_scale((lo[k] + hi[k]) / 2, self.power_of_two)}
