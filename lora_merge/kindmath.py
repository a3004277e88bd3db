"""The merge's arithmetic for the adapter kinds of ``kinds.py``, rounded once from the exact value.

An additive kind's rows are computed in float64 (torch), each element with a bound on that computation's error: a
few units of float64's roundoff times the sum of the magnitudes of its terms, which are short (the factors' inner
sizes). Where that bound leaves an element's rounding to the output dtype open (a rounding boundary of the dtype
within it), the element's exact value is summed in fractions from the stored values and rounded to odd
(``exact.to_odd``), so that the one rounding that follows is the exact value's. IA3's product W · l of two stored
values is exact in float64 already.

Each delta is seen as the stored tensor sees it: ``rows_view`` swaps a transposed delta's factors, so that stored
row i, column j is the view's (i, j).
"""

from __future__ import annotations

from fractions import Fraction

import torch

from .adapter import LowRank
from .exact import to_odd
from .kinds import ADDITIVE, Hadamard, Kronecker

UNIT = 2.0**-53


class RowsView:
    """One delta as the stored tensor (rows × width) sees it: ``value`` and ``magnitude`` (Σ|terms|) of rows
    [start, stop) in float64, and ``exact(i, j)`` in fractions."""

    def __init__(self, d, device):
        self.d = d
        load = lambda t: t.load().to(device=device, dtype=torch.float64).reshape(t.shape[0], -1)  # noqa: E731
        turn = bool(getattr(d, "transposed", False))
        if isinstance(d, Hadamard):
            f = [load(t) for t in d.tensors()]
            # (w1a, w1b, w2a, w2b) of the stored view: Δᵀ = s · (w1bᵀ w1aᵀ) ⊙ (w2bᵀ w2aᵀ)
            self.f = [f[1].T, f[0].T, f[3].T, f[2].T] if turn else f
        elif isinstance(d, Kronecker):
            self.f = [[load(t) for t in parts] for parts in (d.w1, d.w2)]
            if turn:  # kron(w1, w2)ᵀ = kron(w1ᵀ, w2ᵀ); a low-rank factor's transpose swaps its two
                self.f = [[t.T for t in reversed(parts)] for parts in self.f]
        elif isinstance(d, LowRank):
            a, b = load(d.a), load(d.b)
            self.f = [a.T, b.T] if turn else [b, a]  # left (rows × r), right (r × width)
        else:  # AddScaled, on a bias: one column
            self.f = [d.t.load().to(device=device, dtype=torch.float64).reshape(-1, 1)]

    def value(self, start: int, stop: int, magnitude: bool = False) -> torch.Tensor:
        f = [[t.abs() for t in x] if isinstance(x, list) else x.abs() for x in self.f] if magnitude else self.f
        s = abs(self.d.scale) if magnitude else self.d.scale
        d = self.d
        if isinstance(d, Hadamard):
            return (f[0][start:stop] @ f[1]) * (f[2][start:stop] @ f[3]) * s
        if isinstance(d, Kronecker):
            (w1, w2) = (parts[0] if len(parts) == 1 else parts[0] @ parts[1] for parts in f)
            m = w2.shape[0]
            rows = torch.arange(start, stop, device=w1.device)
            out = w1[rows // m][:, :, None] * w2[rows % m][:, None, :]
            return out.reshape(stop - start, -1) * s
        if isinstance(d, LowRank):
            return (f[0][start:stop] @ f[1]) * s
        return f[0][start:stop] * s

    def exact(self, i: int, j: int) -> Fraction:
        d = self.d
        q = lambda x: Fraction(float(x))  # noqa: E731
        if isinstance(d, Hadamard):
            f = self.f
            p1 = sum((q(f[0][i, k]) * q(f[1][k, j]) for k in range(f[0].shape[1])), Fraction(0))
            p2 = sum((q(f[2][i, k]) * q(f[3][k, j]) for k in range(f[2].shape[1])), Fraction(0))
            return q(d.scale) * p1 * p2
        if isinstance(d, Kronecker):
            (w1, w2) = self.f
            m, n = Kronecker.factor_shape(w2)
            return q(d.scale) * _element(w1, i // m, j // n) * _element(w2, i % m, j % n)
        if isinstance(d, LowRank):
            left, right = self.f
            return q(d.scale) * sum((q(left[i, k]) * q(right[k, j]) for k in range(left.shape[1])), Fraction(0))
        return q(d.scale) * q(self.f[0][i, j])


def _element(parts, a: int, b: int) -> Fraction:
    """One element of a full factor, or of a low-rank product, exactly."""
    if len(parts) == 1:
        return Fraction(float(parts[0][a, b]))
    left, right = parts
    return sum((Fraction(float(left[a, k])) * Fraction(float(right[k, b])) for k in range(left.shape[1])), Fraction(0))


def needs_settling(ops) -> bool:
    """Whether the merge of ``ops`` adds a kind (or AdaLoRA's components) whose float64 value may not round as its
    exact value does, and nothing else that the exact value here does not follow."""
    if ops is None or ops.replace is not None or ops.dora_magnitude is not None or ops.row_indices is not None \
            or ops.multiply is not None:
        return False
    kinds = [d for d in ops.deltas if isinstance(d, ADDITIVE) or isinstance(d, LowRank) and d.kind != "lora"]
    return bool(kinds) and not any(isinstance(d, LowRank) and d.experts for d in ops.deltas)


def view(d, device, cache: dict) -> RowsView:
    key = ("view", id(d))
    if key not in cache:
        cache[key] = RowsView(d, device)
    return cache[key]


def add_kind(v: torch.Tensor, d, start: int, stop: int, cache: dict) -> None:
    """Add an additive kind's rows [start, stop) to ``v`` (float64, the stored tensor's rows), in place."""
    flat = v.reshape(v.shape[0], -1)
    flat.add_(view(d, v.device, cache).value(start, stop))


def multiply(v: torch.Tensor, m, start: int, stop: int, cache: dict) -> None:
    """IA3: multiply rows [start, stop) (float64) by ``l`` along its axis, in place: exact in float64."""
    key = ("l", id(m))
    if key not in cache:
        cache[key] = m.l.load().to(device=v.device, dtype=torch.float64).reshape(-1)
    l = cache[key]  # noqa: E741
    if v.dim() == 1:
        v.mul_(l[start:stop])
    elif m.stored_axis(v.dim()) == 0:
        v.mul_(l[start:stop].reshape(-1, *([1] * (v.dim() - 1))))
    else:
        v.mul_(l.reshape(1, -1))


def settle(v: torch.Tensor, w: torch.Tensor, ops, start: int, stop: int, dtype: torch.dtype, cache: dict) -> int:
    """Make the float64 rows ``v`` (W plus every delta of ``ops``) round to ``dtype`` as their exact values do:
    where the computation's error bound holds a rounding boundary, the exact value rounded to odd. Returns how many
    elements were decided exactly."""
    from .mathops import round_to

    if dtype == torch.float64:
        return 0
    flat = v.reshape(v.shape[0], -1)
    width = flat.shape[1]
    views = [view(d, v.device, cache) for d in ops.deltas]
    magnitude = w.reshape(flat.shape).to(torch.float64).abs()
    terms = 0
    for x in views:
        magnitude += x.value(start, stop, magnitude=True)
        terms += getattr(x.d, "rank", 1)
    bound = magnitude.mul_((terms + 6) * 2 * UNIT).add_(flat.abs(), alpha=2 * UNIT)
    low, high = round_to(flat - bound, dtype), round_to(flat + bound, dtype)
    open_ = (low != high).reshape(-1).nonzero().reshape(-1).tolist()
    values, base = flat.reshape(-1), w.reshape(-1)
    for k in open_:
        i, j = divmod(k, width)
        exact = Fraction(float(base[k])) + sum((x.exact(start + i, j) for x in views), Fraction(0))
        values[k] = to_odd(exact)
    return len(open_)
