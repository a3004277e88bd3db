"""The check of a tensor written back in BASE's quantized format, against its exact merged value.

The exact value comes from the check's own computation (``elements.expected_rows``: BASE decoded exactly,
plus W + s·B·A in float64). What is stored must then be, element by element, the nearest value of the
format's grid at the stored scale (within half a step, the step being the grid's spacing at the exact
value), and each block whose stored values are not exactly the merged ones must carry the scale the
format defines for its largest |value|. Blocks stored exactly (those whose values the adapter did not
change keep BASE's bytes) need no particular scale. Errors are reported in steps of the format.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..buffers import flat_nonzero
from ..numbers.quantized import QuantizedTensor
from .elements import (
    COMPUTE_UNIT,
    Factors,
    change_survival,
    expected_rows,
)
from .verdict import HALF, NOISE, SCALE_TOLERANCE, Survival, TensorVerdict


class GridCheck:
    """Every element and every scale of one merged tensor stored in a quantized format.

    Feed it the stored parts in row blocks, in order (``block``), then read ``result()``.
    """

    def __init__(self, e, device, buffers=None):
        self.e, self.q, self.device, self.buffers = e, e.base, device, buffers
        assert isinstance(self.q, QuantizedTensor)
        self.factors = Factors(device)
        self.worst = self.worst_of_bound = 0.0
        self.failed = 0
        self.first = None
        self.finite = True
        self.blocks = self.exact_blocks = self.bad_scales = 0
        self.first_bad_scale = None
        self.pending = None  # a row of scale blocks begun in an earlier block: (index, largest, differs, scales)
        self.stored, self.largest = None, 0.0  # the last stored parts seen; the largest exact |value| so far
        self.survival = self.survival_bf16 = Survival()

    def block(self, start: int, stop: int, stored) -> None:
        """Check dense rows [start, stop) from their stored parts (any device)."""
        q = self.q
        stored = tuple(t.to(self.device) for t in stored)
        self.stored = stored
        rows = expected_rows(self.e, self.factors, start, stop, self.buffers)
        exact = rows.value
        if exact.numel():
            self.largest = max(self.largest, float(exact.abs().max()))
        got = q.decode(stored, start, stop)
        self.finite = self.finite and bool(torch.isfinite(got).all())
        error = (got - exact).abs_()
        spacing = q.spacing(stored, exact, start, stop)
        size = exact.abs()
        bound = size.mul(NOISE).add_(spacing, alpha=HALF)
        bad = ~(error <= bound)
        if bad.any():  # another tool's float32 merge may round the other way near a halfway point
            flat = bound.reshape(-1)
            picked = flat_nonzero(bad)
            flat[picked] += rows.products(picked) * ((rows.rank + 2) * COMPUTE_UNIT + NOISE)
            bad = ~(error <= bound)
        self.worst = max(self.worst, _largest(error / spacing))
        self.worst_of_bound = max(self.worst_of_bound, _largest(error / bound))
        count = int(bad.sum())
        if count:
            self.failed += count
            if self.first is None:
                i = int(flat_nonzero(bad)[0])
                index = [int(x) for x in torch.unravel_index(torch.tensor(i), exact.shape)]
                index[0] += start
                self.first = {"index": index, "value": float(got.reshape(-1)[i]),
                              "expected": float(exact.reshape(-1)[i]), "bound": float(bound.reshape(-1)[i])}
        self._scales(start, stop, q.block_max(size, start, stop), q.block_any(got != exact, start, stop),
                     q.stored_scales(stored))
        if rows.base is not None:  # how much of the change the format kept, and --dtype bfloat16 would keep
            w = rows.base.to(exact.device)
            self.survival += change_survival(w, exact, got)
            b = exact.to(torch.float32).to(torch.bfloat16)
            alternative = change_survival(w, exact, b.to(torch.float64))
            changed = int(torch.count_nonzero(b != w.to(torch.float32).to(torch.bfloat16)))
            self.survival_bf16 += replace(alternative, changed=changed)

    def _scales(self, start: int, stop: int, largest, differs, scales) -> None:
        """Each row of scale blocks once all of its dense rows have been seen."""
        q = self.q
        first, last = q.part_rows(1, start, stop)
        if self.pending is not None and self.pending[0] == first:
            _, p_largest, p_differs, _ = self.pending
            largest[0] = torch.maximum(largest[0], p_largest)
            differs[0] |= p_differs
        self.pending = None
        done = last - first
        if min(q.shape[0], last * q.row_unit) > stop:  # the last row of blocks goes on in the next rows
            done -= 1
            self.pending = (last - 1, largest[done], differs[done], scales[done])
        self._judge(largest[:done], differs[:done], scales[:done], first)

    def _judge(self, largest, differs, scales, first_row: int) -> None:
        q = self.q
        right = torch.zeros_like(differs)
        for nudge in (0.0, -NOISE, NOISE):  # a largest |value| on a rounding boundary of the scale
            fresh = q.fresh_scales(largest * (1 + nudge), self.stored)
            right |= (scales - fresh).abs() <= fresh * SCALE_TOLERANCE
        wrong = differs & ~right
        self.blocks += differs.numel()
        self.exact_blocks += int((~differs).sum())
        count = int(wrong.sum())
        if count:
            self.bad_scales += count
            if self.first_bad_scale is None:
                i = int(flat_nonzero(wrong)[0])
                index = [int(x) for x in torch.unravel_index(torch.tensor(i), wrong.shape)]
                index[0] += first_row
                self.first_bad_scale = {"block": index, "scale": float(scales.reshape(-1)[i]),
                                        "expected": float(q.fresh_scales(largest.reshape(-1)[i:i + 1], self.stored)[0])}

    def result(self) -> TensorVerdict:
        if self.pending is not None:  # the tensor's last rows were never given: judge what was seen
            _, largest, differs, scales = self.pending
            self._judge(largest[None], differs[None], scales[None], self.pending[0])
            self.pending = None
        wrong = self.q.check_global(self.stored, self.largest) if self.stored is not None else None
        if wrong is not None:  # a tensor-wide scale that is neither BASE's nor the format's for the merge
            self.bad_scales += 1
            self.first_bad_scale = self.first_bad_scale or {"block": "the tensor's", "scale": wrong[0],
                                                            "expected": wrong[1]}
        return TensorVerdict(
            check="requantized", format=self.q.description, finite=self.finite, failed_elements=self.failed,
            max_error_ulp=self.worst, max_error_of_bound=self.worst_of_bound,  # in steps of the format
            correctly_rounded=self.worst <= HALF + 1e-6, first_failure=self.first, scale_blocks=self.blocks,
            scale_blocks_exact=self.exact_blocks, scale_failures=self.bad_scales,
            first_scale_failure=self.first_bad_scale, survival=self.survival if self.survival.elements else None,
            survival_bf16=self.survival_bf16 if self.survival_bf16.elements else None)


def _largest(ratio) -> float:
    """The largest of error / step ratios, where 0 / 0 (an exact zero in a block of scale 0) counts as 0."""
    return float(ratio.nan_to_num_(nan=0.0, posinf=math.inf).max()) if ratio.numel() else 0.0
