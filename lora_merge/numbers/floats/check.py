"""The check of a tensor of a float dtype merged on the CPU (see ``merge.py`` beside it), with code of its own.

It reads BASE's rows itself, prepares the adapter's factors its own way (the scale folded into the right factor,
where the merge folds it into the left), computes its own product with BLAS and asks ``kernels`` whether each
stored element is, beyond the arithmetic's rigorous error bound, the nearest value of its dtype to the exact
W + s·B·A. Those it cannot prove so are measured in float64 against the rounding bound of ``elements`` (one
rounding of the sum and of the delta, plus float32 arithmetic error), so that another tool's float32 merge passes
while an element moved one ulp past the bound fails. It also adds up how much of the exact change the stored
tensor carries (``Survival``).
"""

from __future__ import annotations

import math

import numpy as np

from ... import kernels
from ...buffers import HostBuffers
from ...check.verdict import Survival, TensorVerdict
from ...dtypes import DTYPES
from ...reader import as_float32, read_into
from .spec import OPEN_SHARE

COMPUTE_UNIT = 2.0**-24  # float32's unit roundoff: the bound admits a merge computed in float32


def own_terms(entry) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """(left, right, scale) of each delta, so that the delta on the stored tensor seen as rows × width is
    left @ (scale · right): prepared from the adapter's tensors by the check's own reading of them."""
    from ...adapter import AddScaled

    width = math.prod(entry.shape[1:]) if len(entry.shape) > 1 else entry.shape[0]
    found = []
    for d in entry.ops.deltas if entry.ops is not None else ():
        if isinstance(d, AddScaled):
            found.append((np.ones((1, 1), np.float32), as_float32(d.t).reshape(1, width), d.scale))
            continue
        a = as_float32(d.a).reshape(d.a.shape[0], -1)  # (r, in)
        b = as_float32(d.b).reshape(d.b.shape[0], -1)  # (out, r)
        # stored (out × in): element (o, i) gets Σ_k b[o, k] a[k, i]; stored (in × out) the same at (i, o)
        found.append((np.ascontiguousarray(a.T), np.ascontiguousarray(b.T), d.scale) if d.transposed
                     else (b, a, d.scale))
    return found


class FloatCheck:
    """Every element of one merged (or converted) tensor: feed it the stored rows in blocks (``block``), in any
    order, then read ``result()``."""

    def __init__(self, entry, buffers: HostBuffers | None = None):
        self.e = entry
        self.buffers = buffers or HostBuffers()
        self.wide = entry.dtype == "F32"
        self.kind, self.in_kind = kernels.KINDS[entry.dtype], kernels.KINDS[entry.base.dtype]
        self.width = math.prod(entry.shape[1:]) if len(entry.shape) > 1 else entry.shape[0]
        self.vector = len(entry.shape) == 1
        compute = np.float64 if self.wide else np.float32
        self.terms = own_terms(entry)
        self.rank = sum(left.shape[1] for left, _, _ in self.terms)
        rows = 1 if self.vector else entry.shape[0]
        self.left = np.concatenate([left for left, _, _ in self.terms], axis=1).astype(compute) if self.terms \
            else np.zeros((rows, 0), compute)
        right = np.concatenate([right.astype(np.float64) * s for _, right, s in self.terms]).astype(compute) \
            if self.terms else np.zeros((0, self.width), compute)
        self.right = kernels.pack(right)
        # the adapter's own factors (exact float32) and each row of A's scale: what an element is measured against
        self.right0 = np.ascontiguousarray(np.concatenate([right for _, right, _ in self.terms]).T) if self.terms \
            else np.zeros((self.width, 0), np.float32)  # width × r: one element's factors side by side
        self.left0 = np.ascontiguousarray(self.left.astype(np.float32))
        self.scales = np.concatenate([np.full(right.shape[0], s) for _, right, s in self.terms]) if self.terms \
            else np.zeros(0)
        # |fl(w + fl(B @ fl(s·A))) - v| <= u(1 + u) |v| + (r + 2) u Σ|B||sA|: 4u for |v| and (r + 6) u for the
        # product's terms (their sum within (r + 1) u of itself), with room for the bound's own rounding, and
        # float32 underflow's share
        unit = 2.0**-53 if self.wide else 2.0**-24
        self.c = 4 * unit if self.terms else 0.0
        self.c_terms = (self.rank + 6) * unit * (1 + (self.rank + 2) * unit)
        self.slack = (self.rank + 1) * (2.0**-1022 if self.wide else 2.0**-126) if self.terms else 0.0
        self.sums = np.zeros(5, np.float64)
        self.elements = 0
        self.worst = self.worst_of_bound = 0.0
        self.failed = 0
        self.first = None
        self.finite = True
        self.measured = 0

    def _base_rows(self, start: int, stop: int) -> np.ndarray:
        """BASE's elements of rows [start, stop), as stored, read by the check itself."""
        info = self.e.base
        row = info.nbytes if self.vector else info.row_bytes
        raw = self.buffers("base", ((stop - start) * row,), np.uint8)
        read_into(info.path, info.start + row * start, raw)
        return raw.view(np.float32 if info.dtype == "F32" else np.uint16)

    def block(self, start: int, stop: int, stored) -> None:
        """Check rows [start, stop) as stored (an array of the output's elements, any shape)."""
        if self.vector:
            start, stop = 0, 1
        stored = np.asarray(stored).reshape(-1).view(np.float32 if self.wide else np.uint16)
        w = self._base_rows(start, stop)
        n = (stop - start) * self.width
        left = self.left[start:stop]
        bound = (self.rank, self.c_terms, self.slack, stop - start, self.width, self.c)
        for passes in (kernels, kernels.plain):  # the plain passes list every element left open, however many
            idx = self.buffers("flagged", (n // OPEN_SHARE + 1 if passes is kernels else n,), np.int64)
            sums = np.zeros(5, np.float64)
            if self.wide:
                count = passes.check32(w, self.in_kind, left, self.right, *bound, stored, idx, sums)
            else:
                count = passes.check16(self.kind, w, self.in_kind, left, self.right, *bound, stored, idx, sums)
            if count <= len(idx):
                break
        self.sums += sums
        self.elements += n
        if count < n:  # the nearest value of the dtype is within half an ulp
            self.worst = max(self.worst, 0.5)
        if count:
            self._measure(idx[:count], start, w, stored)

    def _measure(self, flat: np.ndarray, t0: int, w: np.ndarray, stored: np.ndarray) -> None:
        """The elements not proven nearest, against the rounding bound: ½ ulp(v) + ½ ulp(Δ) + (r + 2) u32 |s| Σ|B||A|,
        plus float64's own noise."""
        dtype = self.e.dtype
        self.measured += len(flat)
        n = len(flat)
        w64, delta, size = np.empty(n), np.empty(n), np.empty(n)
        kernels.gather(flat, w, self.in_kind, self.left0[t0:], self.right0, self.scales, self.width, w64, delta, size)
        have = kernels.plain.load(self.kind, stored[flat], wide=True) if not self.wide else \
            stored[flat].astype(np.float64)
        with np.errstate(all="ignore"):
            products = size - np.abs(w64)  # |s| Σ |B| |A|
            v = kernels.plain.add(w64, delta)
            self.finite = self.finite and bool(np.isfinite(have).all())
            unit = ulp(v, dtype)
            bound = products * ((self.rank + 2) * COMPUTE_UNIT + 2.0**-45) + np.abs(v) * 2.0**-45 + 0.5 * unit
            if self.terms:
                bound += 0.5 * ulp(delta, dtype)
            error = np.abs(have - v)
            # past the largest finite value by half an ulp or more, the nearest value is the infinity itself
            overflow = np.isinf(have) & (np.abs(v) >= overflow_threshold(dtype)) & ((have > 0) == (v > 0))
            error[overflow] = 0.0
            # NaN where the exact value is NaN, or the very infinity it is, is what the merge must give (whether
            # NaN or Inf is acceptable at all is the finite check's judgement); any other NaN fails
            same = (have == v) | (np.isnan(have) & np.isnan(v))
            error[same] = 0.0
            bad = ~(error <= bound) & ~same
            self.worst = max(self.worst, _largest(error / unit))
            self.worst_of_bound = max(self.worst_of_bound, _largest(np.nan_to_num(error / bound, nan=0.0)))
        count = int(bad.sum())
        if count:
            self.failed += count
            if self.first is None:
                k = int(np.flatnonzero(bad)[0])
                index = [int(x) for x in np.unravel_index(int(flat[k]) + t0 * self.width, self.e.shape)] \
                    if not self.vector else [int(flat[k])]
                self.first = {"index": index, "value": float(have[k]), "expected": float(v[k]),
                              "bound": float(bound[k])}

    def result(self) -> TensorVerdict:
        dd, rr, ee, rd, changed = (float(x) for x in self.sums)
        survival = Survival(dd, rr, ee, rd, int(changed), self.elements) if self.terms else None
        return TensorVerdict(
            check="merged" if self.e.is_merge else "converted", finite=self.finite,
            failed_elements=self.failed, max_error_ulp=self.worst,
            max_error_of_bound=self.worst_of_bound,
            correctly_rounded=self.worst <= 0.5 + 1e-6,  # float64 noise on an exact tie can read a hair above
            first_failure=self.first, survival=survival)


def ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    """The unit in the last place of ``dtype`` at each |x| (x float64), subnormals included."""
    d = DTYPES[dtype]
    with np.errstate(all="ignore"):
        power = (x.view(np.int64) & 0x7FF0000000000000).view(np.float64)  # 2^floor(log2|x|); 0 for 0, inf for NaN
        return np.maximum(power * 2.0 ** -d.mantissa, 2.0 ** (d.min_exponent - d.mantissa))


def overflow_threshold(dtype: str) -> float:
    """The magnitude from which rounding to nearest in ``dtype`` gives infinity: max + ½ ulp(max)."""
    top, bits = DTYPES[dtype].max_exponent, DTYPES[dtype].mantissa
    return (2.0 - 2.0**-bits) * 2.0**top + 2.0 ** (top - bits - 1)


def _largest(ratio: np.ndarray) -> float:
    if not ratio.size:
        return 0.0
    top = float(np.max(ratio))
    return math.inf if math.isnan(top) else top
