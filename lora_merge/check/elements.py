"""The exact value of every merged element, and the check of stored elements against it.

This is the parity check's own computation with torch (for the tensors merged with torch, and every tensor on a GPU),
kept apart from the merge's (``mathops``): it loads the
adapter's factors itself, computes W + s·B·A (DoRA, trainable rows, replacements included) in float64,
and decides for each stored element whether it is the nearest value of its dtype, or else how far it
is, in ulp and against a rounding bound. The bound allows one rounding of the sum and one of the delta
plus float32 arithmetic error, so that any correct merge passes (peft's float32 one included) and an
element moved one ulp beyond it fails.

``ElementCheck`` takes a tensor's blocks in any order of arrival: the blocks the merge is about to
write (the merge checks its own output as it goes), or blocks read back from a folder by ``verify``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from .. import kernels
from ..adapter import AddScaled, FileTensor, LowRank, TargetOps
from ..buffers import Buffers, flat_nonzero
from ..dtypes import DTYPES
from ..numbers.quantized import QuantizedTensor
from ..plan import Entry
from ..reader import tensor_rows
from .kinds import kind_rows, multiplied
from .verdict import CHECK_BLOCK_BYTES, Survival, TensorVerdict

COMPUTE_UNIT = 2.0**-24  # float32 unit roundoff: the bound admits a merge computed in float32


def ulp(x, dtype: str):
    """The unit in the last place of ``dtype`` at each |x| (x float64), subnormals included."""
    # keeping only the exponent bits of a float64 gives 2^floor(log2|x|) (0 for 0, inf for inf/NaN)
    power = (x.view(torch.int64) & 0x7FF0000000000000).view(torch.float64)
    d = DTYPES[dtype]
    return power.mul_(2.0 ** -d.mantissa).clamp_(min=2.0 ** (d.min_exponent - d.mantissa))


def overflow_threshold(dtype: str) -> float:
    """The magnitude from which rounding to nearest in ``dtype`` gives infinity: max + ½ ulp(max)."""
    top, bits = DTYPES[dtype].max_exponent, DTYPES[dtype].mantissa
    largest = (2.0 - 2.0**-bits) * 2.0**top
    return largest + 2.0 ** (top - bits - 1)


class Factors:
    """The adapter's factors in float64 on the device, read once per tensor."""

    def __init__(self, device):
        self.device = device
        self.cache: dict[int, object] = {}

    def get(self, t):
        if id(t) not in self.cache:
            self.cache[id(t)] = t.load().to(device=self.device, dtype=torch.float64)
        return self.cache[id(t)]

    def derived(self, key: tuple, make):
        """A value made from the factors (OFT's blocks of R, FourierFT's columns), made once per tensor."""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


@dataclass
class Rows:
    """Rows [start, stop) of a planned tensor, exactly: ``value``; ``delta_at(flat)`` the exact delta at chosen
    elements (None: no delta); ``products(flat)`` the sums of |factor| products the rounding bound needs."""

    value: torch.Tensor
    rank: int
    products: object
    delta_at: object = None
    base: object = None  # BASE's rows (None: replaced by the adapter's tensor), for how much of the change is kept


def _plain(ops: TargetOps | None) -> bool:
    """Deltas only (the common case): computed in place in a reused buffer."""
    return ops is None or (ops.replace is None and ops.dora_magnitude is None and ops.row_indices is None
                           and ops.multiply is None)


def expected_rows(e: Entry, f: Factors, start: int, stop: int, buffers: Buffers | None = None,
                  dora_norm=None) -> Rows:
    """The exact value of rows [start, stop) of the planned tensor ``e``, from BASE's bytes and the adapter's
    factors (``buffers``: reuse its float64 buffer for the value, for plain deltas)."""
    ops = e.ops
    if ops is not None and ops.replace is not None:
        raw = ops.replace.rows(start, stop) if e.shape else ops.replace.load()
    elif isinstance(e.base, QuantizedTensor):  # decoded exactly
        raw = e.base.rows(start, stop)
    elif buffers is not None and buffers.device.type == "cpu":  # BASE's rows, into a reused buffer
        raw = tensor_rows(e.base, start, stop, buffers, "base")
    else:
        raw = FileTensor(e.base).rows(start, stop) if e.shape else FileTensor(e.base).load()
    raw = raw.to(f.device)
    if _plain(ops) and buffers is not None:
        value = buffers.take("exact", tuple(raw.shape), torch.float64)
        value.copy_(raw)
        rank, parts = _add_deltas(value, ops, f, start, stop, e.shape)
        flat_value, flat_raw = value.reshape(-1), raw.reshape(-1)
        delta_at = (lambda flat: flat_value[flat] - flat_raw[flat].to(torch.float64)) if parts else None
        return Rows(value, rank, _summed(parts, f.device), delta_at, raw)
    return _general_rows(e, ops, f, raw, start, stop, dora_norm)


def _add_deltas(value, ops: TargetOps | None, f: Factors, start: int, stop: int, shape) -> tuple[int, list]:
    """value += every delta of ``ops`` at rows [start, stop); returns the rank and the bound's product terms."""
    rank, parts = 0, []
    for d in ops.deltas if ops is not None else ():
        if isinstance(d, LowRank):
            rank += d.rank
            parts.append(_low_rank_into(value, d, f, start, stop, shape))
        elif isinstance(d, AddScaled):
            t = f.get(d.t)[start:stop]
            value.add_(t, alpha=d.scale)
            parts.append((t.abs() * abs(d.scale)).reshape(-1).__getitem__)
        else:  # another additive kind (kinds.py)
            delta, at = kind_rows(d, f, start, stop)
            value.reshape(value.shape[0], -1).add_(delta)
            rank += d.rank + 1
            parts.append(at)
    return rank, parts


def _low_rank_into(value, d: LowRank, f: Factors, start: int, stop: int, shape):
    """value += rows [start, stop) of s·B·A as peft lays the factors out; returns |s|·Σ|B||A| at chosen elements."""
    a, b = f.get(d.a), f.get(d.b)
    if d.experts:
        e = d.experts
        a = a.reshape(e, -1, a.shape[-1])[start:stop]  # expert-major rows of A: (E, r, in)
        b = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)[start:stop]  # expert index fastest in B: (E, out, r)
        value.baddbmm_(a.transpose(1, 2), b.transpose(1, 2), alpha=d.scale) if d.transposed else \
            value.baddbmm_(b, a, alpha=d.scale)
        bound = torch.einsum("eor,eri->eoi", b.abs() * abs(d.scale), a.abs())
        bound = (bound.transpose(1, 2) if d.transposed else bound).reshape(-1)
        return bound.__getitem__
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    width = math.prod(shape[1:])
    rows = value.reshape(value.shape[0], -1)
    if d.transposed:  # the stored tensor is (in × out): its rows are columns of B·A
        rows.addmm_(a2[:, start:stop].T, b2.T, alpha=d.scale)
        left, right = lambda i, j: b2[j], lambda i, j: a2[:, i].T  # noqa: E731
    else:
        rows.addmm_(b2[start:stop], a2, alpha=d.scale)
        left, right = lambda i, j: b2[i], lambda i, j: a2[:, j].T  # noqa: E731

    def bound(flat):
        i, j = flat // width + start, flat % width
        return (left(i, j).abs() * right(i, j).abs()).sum(dim=1) * abs(d.scale)

    return bound


def _summed(parts: list, device):
    def products(flat):
        total = torch.zeros(flat.shape, dtype=torch.float64, device=device)
        for part in parts:
            total += part(flat)
        return total

    return products


def _general_rows(e: Entry, ops: TargetOps, f: Factors, raw, start: int, stop: int, dora_norm) -> Rows:
    """Replacements, DoRA and trainable rows: each step on its own tensors (rare, and small)."""
    w = raw.to(torch.float64, copy=True)
    value = w.clone()
    rank, parts = multiplied(value, ops.multiply, f, start, stop) if ops is not None and ops.multiply is not None \
        else (0, [])
    more_rank, more_parts = _add_deltas(value, ops, f, start, stop, e.shape)
    rank, parts = rank + more_rank, parts + more_parts
    delta = value - w if parts else None
    products = _summed(parts, f.device)
    if delta is not None and ops.dora_magnitude is not None:
        factor = _dora_factor(ops, f, value, start, stop, dora_norm).expand_as(value)
        magnitude = w.abs().reshape(-1)
        value, delta = value * factor, delta * factor
        flat_factor = factor.reshape(-1)
        plain = products
        products = lambda flat: (magnitude[flat] + plain(flat)) * flat_factor[flat].abs()  # noqa: E731
    if ops is not None and ops.row_indices is not None:
        rows = f.get(ops.rows)
        replaced = torch.zeros(value.shape[0], dtype=torch.bool, device=value.device)
        for j, idx in enumerate(ops.row_indices):
            if start <= idx < stop:
                value[idx - start] = rows[j]
                replaced[idx - start] = True
                if delta is not None:
                    delta[idx - start] = 0
        width = math.prod(value.shape[1:])
        unreplaced = products
        products = lambda flat: torch.where(replaced[flat // width], 0.0, unreplaced(flat))  # noqa: E731
    delta_at = (lambda flat: delta.reshape(-1)[flat]) if delta is not None else None
    return Rows(value, rank, products, delta_at, None if ops is not None and ops.replace is not None else w)


def _dora_factor(ops: TargetOps, f: Factors, value, start: int, stop: int, column_norm):
    """m / ‖W + ΔW‖ along each logical output row, shaped to multiply the stored rows."""
    m = f.get(ops.dora_magnitude).reshape(-1)
    if ops.dora_transposed:
        return (m / column_norm).reshape(1, -1)
    norm = torch.linalg.vector_norm(value.reshape(value.shape[0], -1), dim=1)
    return (m[start:stop] / norm).reshape(-1, *([1] * (value.dim() - 1)))


def dora_column_norm(e: Entry, f: Factors, step: int):
    """For a transposed DoRA target the norms run down the stored columns: a first pass over all rows."""
    ops = e.ops
    total = None
    plain = Entry(e.name, e.dtype, e.shape, e.base, TargetOps(ops.name, ops.module, ops.replace, ops.deltas))
    for start in range(0, e.shape[0], step):
        part = expected_rows(plain, f, start, min(e.shape[0], start + step)).value.square().sum(dim=0)
        total = part if total is None else total + part
    return torch.sqrt(total)


def change_survival(base, values, stored) -> Survival:
    """What the stored values (float64) keep of the change from BASE's to the exact ``values`` (float64), one block:
    on the CPU in one pass of the kernels."""
    w = base.to(torch.float64).reshape(-1).contiguous()
    v, o = values.reshape(-1).contiguous(), stored.reshape(-1).contiguous()
    if v.device.type == "cpu":
        sums = np.zeros(5)
        kernels.survival(w.numpy(), v.numpy(), o.numpy(), sums)
        dd, rr, ee, rd, changed = (float(x) for x in sums)
    else:
        d, r = v - w, o - w
        e = r - d
        dd, rr, ee, rd = (float(torch.dot(a, b)) for a, b in ((d, d), (r, r), (e, e), (r, d)))
        changed = torch.count_nonzero(r)
    return Survival(dd, rr, ee, rd, int(changed), v.numel())


class ElementCheck:
    """Every element of one merged (or converted) tensor against its exact value and rounding bound.

    Feed it the stored tensor in row blocks (``block``), then read ``result()``.
    """

    def __init__(self, e: Entry, device, step: int | None = None, buffers: Buffers | None = None):
        self.e, self.device = e, device
        self.factors = Factors(device)
        self.buffers = buffers or Buffers(device)  # shared by checks that run one after the other
        self.column_norm = None
        if e.ops is not None and e.ops.dora_magnitude is not None and e.ops.dora_transposed:
            self.column_norm = dora_column_norm(e, self.factors, step or e.rows_per_block(CHECK_BLOCK_BYTES))
        self.worst = self.worst_of_bound = 0.0
        self.failed = 0
        self.first = None
        self.finite = True
        self.survival = Survival()

    def block(self, start: int, stop: int, stored) -> None:
        """Check rows [start, stop) as stored (a tensor of the entry's dtype, any device)."""
        e = self.e
        rows = expected_rows(e, self.factors, start, stop, self.buffers, self.column_norm)
        stored = stored.to(self.device).reshape(-1)
        self.finite = self.finite and _all_finite(stored)
        values = rows.value.reshape(-1)
        picked = flat_nonzero(self._not_plainly_nearest(values, stored))
        if picked.numel() < values.numel():
            self.worst = max(self.worst, 0.5)  # the nearest value of the output dtype is within half an ulp
        if picked.numel():
            self._measure(rows, start, values, stored, picked)
        if rows.base is not None and self.e.is_merge:
            self._survival(values, stored, rows.base.reshape(-1))

    def _survival(self, values, stored, base) -> None:
        """Adds the change's sums: ‖ΔW‖², ‖O − W‖², ‖(O − W) − ΔW‖², ⟨O − W, ΔW⟩, elements changed."""
        found = change_survival(base, values, stored.to(torch.float64))
        if base.dtype != stored.dtype:  # written in another dtype: changed from BASE's value in that dtype
            found = replace(found, changed=int(torch.count_nonzero(stored != base.to(stored.dtype))))
        self.survival += found

    def _not_plainly_nearest(self, values, stored):
        """Elements to measure against the bound: all but those that are plainly the nearest value.

        torch's float64 conversion rounds through float32, so it gives the nearest value of a narrower
        dtype except where the float32 value lies exactly halfway between two of its values; where the
        stored element equals that conversion elsewhere, it is within half an ulp of the exact value.
        """
        dtype, take = self.e.dtype, self.buffers.take
        n = (values.numel(),)
        differs = take("differs", n, torch.bool)
        if dtype == "F64":
            return torch.ne(stored, values, out=differs)
        v32 = take("v32", n, torch.float32)
        v32.copy_(values)
        if dtype == "F32":
            return torch.ne(stored.view(torch.int32), v32.view(torch.int32), out=differs)
        nearest = take("nearest", n, stored.dtype)
        nearest.copy_(v32)
        torch.ne(nearest.view(torch.int16), stored.view(torch.int16), out=differs)
        if dtype == "BF16":  # halfway: the 16 bits bfloat16 drops are exactly 0x8000
            low = v32.view(torch.int16)[0::2] if _LITTLE else v32.view(torch.int16)[1::2]
            halfway = torch.eq(low, -0x8000, out=take("halfway", n, torch.bool))
        else:  # F16; its subnormal range has its halfway points elsewhere: all measured
            bits = v32.view(torch.int32)
            halfway = ((bits & 0x1FFF) == 0x1000) | (v32.abs() < 2.0**-14)
        return differs.logical_or_(halfway)

    def _measure(self, rows: Rows, start: int, values, stored, picked) -> None:
        e, ops = self.e, self.e.ops
        v = values[picked]
        have = stored[picked].to(torch.float64)
        unit = ulp(v, e.dtype)
        # ½ ulp(v) + ½ ulp(Δ) + (r + 2)·u32·|s|·|B|·|A|, plus float64 noise (and the norm for DoRA)
        bound = rows.products(picked) * ((rows.rank + 2) * COMPUTE_UNIT + 2.0**-45)
        dora = ops is not None and ops.dora_magnitude is not None
        bound.add_(v.abs(), alpha=2.0**-45 + (4 * COMPUTE_UNIT if dora else 0))
        bound.add_(unit, alpha=0.5)
        if rows.delta_at is not None:
            bound.add_(ulp(rows.delta_at(picked), e.dtype), alpha=0.5)
        error = (have - v).abs_()
        # past the largest finite value by half an ulp or more, the nearest value is the infinity itself
        overflow = have.isinf() & (v.abs() >= overflow_threshold(e.dtype)) & ((have > 0) == (v > 0))
        error[overflow] = 0.0
        # NaN where the exact value is NaN, or the very infinity it is, is what the merge must give (whether NaN or
        # Inf is acceptable at all is the finite check's judgement); any other NaN fails
        same = (have == v) | (have.isnan() & v.isnan())
        error[same] = 0.0
        bad = ~(error <= bound) & ~same
        self.worst = max(self.worst, _nan_is_inf(float((error / unit).max())))
        self.worst_of_bound = max(self.worst_of_bound, _nan_is_inf(float((error / bound).nan_to_num(0.0).max())))
        count = int(bad.sum())
        if count:
            self.failed += count
            if self.first is None:
                i = int(bad.nonzero()[0])
                shape = rows.value.shape
                index = [int(x) for x in torch.unravel_index(torch.tensor(int(picked[i])), shape)]
                if len(shape):
                    index[0] += start
                self.first = {"index": index, "value": float(have[i]), "expected": float(v[i]),
                              "bound": float(bound[i])}

    def result(self) -> TensorVerdict:
        return TensorVerdict(
            check="merged" if self.e.is_merge else "converted", finite=self.finite,
            failed_elements=self.failed, max_error_ulp=self.worst,
            max_error_of_bound=self.worst_of_bound,
            correctly_rounded=self.worst <= 0.5 + 1e-6,  # float64 noise on an exact tie can read a hair above 0.5
            first_failure=self.first, survival=self.survival if self.survival.elements else None)


_LITTLE = __import__("sys").byteorder == "little"


def _all_finite(x) -> bool:
    if x.numel() == 0 or not x.is_floating_point():
        return True
    low, high = torch.aminmax(x)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _nan_is_inf(x: float) -> float:
    return math.inf if math.isnan(x) else x
