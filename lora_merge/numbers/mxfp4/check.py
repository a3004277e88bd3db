"""The check of MXFP4 experts written back in their format on the CPU (see ``merge.py`` beside it), with code of its
own: BASE's bytes read by the check itself, the adapter's factors prepared its own way (the scale folded into the
right factor), each stored value proven within half a step of the e2m1 grid at its group's scale of the exact
W + s·B·A by the MXFP4 kernel or measured in float64 against ``grid.GridCheck``'s bound, and each group whose
stored values are not exactly the merged ones checked for the exponent the format defines.
"""

from __future__ import annotations

import math

import numpy as np

from ... import kernels
from ...buffers import HostBuffers
from ...check.verdict import HALF, NOISE, SUMS, QuantizedTally, largest
from ...kernels.args import Mxfp4Check as Mxfp4CheckArgs
from ...kernels.args import Product
from ..floats.check import COMPUTE_UNIT
from ..floats.spec import OPEN_SHARE
from .spec import E2M1, GROUP, ExpertFactors, fresh_exponent, read_rows


class Mxfp4Check(QuantizedTally):
    """Every element and every exponent of one MXFP4 tensor as stored: feed it blocks of stored rows (``block``),
    then read ``result()``."""

    def __init__(self, entry, buffers: HostBuffers | None = None):
        self.e, self.q = entry, entry.base
        self.buffers = buffers or HostBuffers()
        self.experts, self.width, self.out = self.q.shape
        self.f = ExpertFactors(entry, fold_right=True)
        unit = COMPUTE_UNIT
        self.c = 4 * unit
        self.c_terms = (self.f.rank + 6) * unit * (1 + (self.f.rank + 2) * unit)
        self.slack = (self.f.rank + 1) * 2.0**-126
        super().__init__(self.q.description)

    def block(self, first: int, last: int, stored) -> None:
        """Check stored rows [first, last) (of one expert) from their block bytes and scale bytes as written."""
        k, o0 = divmod(first, self.out)
        rows, groups = last - first, self.width // GROUP
        blocks = np.asarray(stored[0]).reshape(-1).view(np.uint8)
        scales = np.asarray(stored[1]).reshape(-1).view(np.uint8)
        self.finite = self.finite and not bool(np.any(scales == 255))
        base_blocks, base_scales = read_rows(self.q, first, last, self.buffers, "check ")
        left, right, _, _, _ = self.f.expert(k)
        n = rows * self.width
        verdicts, sums = np.zeros(rows * groups, np.uint8), np.zeros(SUMS)
        product = Product(left[o0:o0 + rows], right, self.f.rank, self.c_terms, self.slack, self.c)
        args = Mxfp4CheckArgs(base_blocks, base_scales, blocks, scales, product, rows, self.width).flat()
        idx = self.buffers("flagged", (n // OPEN_SHARE + 1,), np.int64)
        count = kernels.MXFP4.mx_check(*args, idx, sums, verdicts)
        if count > len(idx):
            idx, sums = self.buffers("flagged", (n,), np.int64), np.zeros(SUMS)
            count = kernels.MXFP4.mx_check(*args, idx, sums, verdicts)
        self.sums += sums
        self.elements += n
        if count < n:
            self.worst = max(self.worst, HALF)
        if count:
            self._measure(k, o0, idx[:count], base_blocks, base_scales, blocks, scales)
        self.blocks += len(verdicts)
        self.exact_blocks += int(np.count_nonzero((verdicts & 1) == 0))
        wrong = np.flatnonzero(verdicts & 2)
        if len(wrong):
            self.bad_scales += len(wrong)
            if self.first_bad_scale is None:
                i, g = divmod(int(wrong[0]), groups)
                cols = np.arange(g * GROUP, (g + 1) * GROUP)
                _, _, left0, right0, sc = self.f.expert(k)
                nib = kernels.plain.unpack_nibbles(base_blocks, rows, self.width)[i, cols]
                w = E2M1[nib] * math.ldexp(1.0, int(base_scales[wrong[0]]) - 127)
                exact = w + (left0[o0 + i].astype(np.float64) * right0[cols].astype(np.float64) * sc).sum(axis=1)
                largest = float(np.max(np.abs(exact)))
                expected = fresh_exponent(largest) if largest > 0 else -127
                self.first_bad_scale = {"block": [k, int(o0 + i), g],
                                        "scale": math.ldexp(1, int(scales[wrong[0]]) - 127),
                                        "expected": math.ldexp(1, expected)}

    def _measure(self, k: int, o0: int, flat, base_blocks, base_scales, blocks, scales) -> None:
        groups = self.width // GROUP
        rows = len(base_scales) // groups
        i, j = flat // self.width, flat % self.width
        bn = kernels.plain.unpack_nibbles(base_blocks, rows, self.width)
        on = kernels.plain.unpack_nibbles(blocks, rows, self.width)
        bs = base_scales.reshape(rows, groups).astype(np.int64) - 127
        ss = scales.reshape(rows, groups).astype(np.int64) - 127
        _, _, left0, right0, sc = self.f.expert(k)
        w = E2M1[bn[i, j]] * np.ldexp(1.0, bs[i, j // GROUP])
        products = left0[o0 + i].astype(np.float64) * right0[j].astype(np.float64) * sc
        exact = w + products.sum(axis=1)
        scale = np.ldexp(1.0, ss[i, j // GROUP])
        got = E2M1[on[i, j]] * scale
        with np.errstate(all="ignore"):
            error = np.abs(got - exact)
            a = np.abs(exact) / scale  # e2m1's step at the exact value, beyond 6 the one below it
            step = np.where(a < 2, 0.5, np.where(a < 4, 1.0, 2.0)) * scale
            bound = np.abs(exact) * NOISE + HALF * step
            bad = ~(error <= bound)
            bound = np.where(bad, bound + np.abs(products).sum(axis=1) * ((self.f.rank + 2) * COMPUTE_UNIT + NOISE),
                             bound)
            bad = ~(error <= bound)
            self.worst = max(self.worst, largest(error / step))
            self.worst_of_bound = max(self.worst_of_bound, largest(error / bound))
        count = int(bad.sum())
        if count:
            self.failed += count
            if self.first is None:
                x = int(np.flatnonzero(bad)[0])
                # the dense (experts × in × out) view's index, as the report names elements
                self.first = {"index": [k, int(j[x]), int(o0 + i[x])], "value": float(got[x]),
                              "expected": float(exact[x]), "bound": float(bound[x])}
