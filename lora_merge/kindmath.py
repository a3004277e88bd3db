"""The merge's arithmetic for the adapter kinds of ``kinds.py``, rounded once from the exact value.

An additive kind's rows are computed in float64 (torch), each element with a bound on that computation's error: a
few units of float64's roundoff times the sum of the magnitudes of its terms, which are short (the factors' inner
sizes). Where that bound leaves an element's rounding to the output dtype open (a rounding boundary of the dtype
within it), the element's exact value is summed in fractions from the stored values and rounded to odd
(``exact.to_odd``), so that the one rounding that follows is the exact value's. IA3's product W · l of two stored
values is exact in float64 already.

Each delta is seen as the stored tensor sees it: ``RowsView`` swaps a transposed delta's factors, so that stored
row i, column j is the view's (i, j).
"""

from __future__ import annotations

from fractions import Fraction

import torch

from . import fouriermath, orthomath, roadmath
from .adapter import LowRank
from .exact import to_odd
from .kinds import ADDITIVE, Hadamard, Kronecker, Spectrum, Tiled
from .mathops import round_to
from .transforms import MIXING, Pairs, Scaling

UNIT = 2.0**-53


class Factor:
    """One factor of LoHa or LoKr as the stored tensor sees it (transposed where the delta is): rows of its value
    and of its magnitude (Σ|terms|) in float64, and one element exactly."""

    def __init__(self, parts: tuple, device, turn: bool):
        load = lambda t: t.load().to(device=device, dtype=torch.float64)  # noqa: E731
        self.parts = [load(t) for t in parts]
        if len(parts) < 3:
            self.parts = [t.reshape(t.shape[0], -1) for t in self.parts]
            if turn:  # a transposed full factor, or a low-rank product with its two swapped and transposed
                self.parts = [t.T for t in reversed(self.parts)]
        self._whole = {}

    def rows(self, start: int, stop: int, magnitude: bool = False) -> torch.Tensor:
        f = [t.abs() for t in self.parts] if magnitude else self.parts
        if len(f) == 1:
            return f[0][start:stop]
        if len(f) == 2:
            return f[0][start:stop] @ f[1]
        t, a, b = f  # the CP form: F[p, c, k, l] = Σᵢⱼ t[i, j, k, l] a[i, p] b[j, c]
        inner = torch.einsum("ijkl,jc->ickl", t, b)
        return torch.einsum("ip,ickl->pckl", a[:, start:stop], inner).reshape(stop - start, -1)

    def row_bound(self, start: int, stop: int) -> torch.Tensor:
        """(rows × 1): at least Σ|terms| of every element of each of rows [start, stop): for a low-rank product
        Σₜ |a[i, t]|·maxⱼ |b[t, j]|, one small product instead of a matmul as large as the value's."""
        f = self.parts
        if len(f) == 2:
            if "right_max" not in self._whole:
                self._whole["right_max"] = f[1].abs().amax(dim=1)
            return (f[0][start:stop].abs() @ self._whole["right_max"]).unsqueeze(1)
        return self.rows(start, stop, magnitude=True).amax(dim=1, keepdim=True)

    def whole(self, magnitude: bool = False) -> torch.Tensor:
        if magnitude not in self._whole:
            rows = self.parts[1].shape[1] if len(self.parts) == 3 else self.parts[0].shape[0]
            self._whole[magnitude] = self.rows(0, rows, magnitude)
        return self._whole[magnitude]

    def exact(self, i: int, j: int) -> Fraction:
        f = self.parts
        if len(f) == 1:
            return _q(f[0][i, j])
        if len(f) == 2:
            return sum((_q(f[0][i, k]) * _q(f[1][k, j]) for k in range(f[0].shape[1])), Fraction(0))
        t, a, b = f
        kernel = t.shape[2] * t.shape[3]
        c, kl = divmod(j, kernel)
        k, l = divmod(kl, t.shape[3])  # noqa: E741
        return sum((_q(t[x, y, k, l]) * _q(a[x, i]) * _q(b[y, c]) for x in range(t.shape[0])
                    for y in range(t.shape[1])), Fraction(0))


def _q(x) -> Fraction:
    return Fraction(float(x))


class RowsView:
    """One delta as the stored tensor (rows × width) sees it: ``value`` and ``magnitude`` (Σ|terms|) of rows
    [start, stop) in float64, and ``exact(i, j)`` in fractions."""

    def __init__(self, d, device):
        self.d = d
        load = lambda t: t.load().to(device=device, dtype=torch.float64).reshape(t.shape[0], -1)  # noqa: E731
        turn = bool(getattr(d, "transposed", False))
        if isinstance(d, (Hadamard, Kronecker)):  # kron(w1, w2)ᵀ = kron(w1ᵀ, w2ᵀ), and (F1 ⊙ F2)ᵀ = F1ᵀ ⊙ F2ᵀ
            self.f = [Factor(parts, device, turn) for parts in (d.w1, d.w2)]
        elif isinstance(d, Tiled):
            self.f = [load(d.block).T.contiguous()]  # (m × r): row o mod m, column j mod r
        elif isinstance(d, LowRank):
            a, b = load(d.a), load(d.b)
            self.f = [a.T, b.T] if turn else [b, a]  # left (rows × r), right (r × width)
        else:  # AddScaled, on a bias: one column
            self.f = [d.t.load().to(device=device, dtype=torch.float64).reshape(-1, 1)]

    def value(self, start: int, stop: int, magnitude: bool = False) -> torch.Tensor:
        d = self.d
        s = getattr(d, "scale", 1.0)
        s = abs(s) if magnitude else s
        if isinstance(d, Hadamard):
            return self.f[0].rows(start, stop, magnitude) * self.f[1].rows(start, stop, magnitude) * s
        if isinstance(d, Kronecker):
            w1, w2 = (x.whole(magnitude) for x in self.f)
            m = w2.shape[0]
            rows = torch.arange(start, stop, device=w1.device)
            out = w1[rows // m][:, :, None] * w2[rows % m][:, None, :]
            return out.reshape(stop - start, -1) * s
        f = [x.abs() for x in self.f] if magnitude else self.f
        if isinstance(d, LowRank):
            return (f[0][start:stop] @ f[1]) * s
        if isinstance(d, Tiled):
            (m, r), width = f[0].shape, d.size[1]
            rows = torch.arange(start, stop, device=f[0].device) % m
            return f[0][rows][:, torch.arange(width, device=f[0].device) % r] * s
        return f[0][start:stop] * s

    def magnitude(self, start: int, stop: int) -> torch.Tensor:
        """At least Σ|terms| of each element of rows [start, stop), broadcastable to the rows: per row where that
        saves a matmul (LoHa, LoKr, LoRA's products; looser, never smaller)."""
        d = self.d
        s = abs(getattr(d, "scale", 1.0))
        if isinstance(d, Hadamard):
            return self.f[0].row_bound(start, stop) * self.f[1].row_bound(start, stop) * s
        if isinstance(d, Kronecker):
            w1, w2 = (x.whole(True).amax(dim=1) for x in self.f)
            m = len(w2)
            rows = torch.arange(start, stop, device=w1.device)
            return (w1[rows // m] * w2[rows % m] * s).unsqueeze(1)
        if isinstance(d, LowRank):
            left, right = self.f
            return (left[start:stop].abs() @ right.abs().amax(dim=1)).unsqueeze(1) * s
        return self.value(start, stop, magnitude=True)

    def exact(self, i: int, j: int) -> Fraction:
        d = self.d
        if isinstance(d, Hadamard):
            return _q(d.scale) * self.f[0].exact(i, j) * self.f[1].exact(i, j)
        if isinstance(d, Kronecker):
            m, n = self.f[1].whole().shape
            return _q(d.scale) * self.f[0].exact(i // m, j // n) * self.f[1].exact(i % m, j % n)
        if isinstance(d, Tiled):
            m, r = self.f[0].shape
            return _q(d.scale) * _q(self.f[0][i % m, j % r])
        if isinstance(d, LowRank):
            left, right = self.f
            return _q(d.scale) * sum((_q(left[i, k]) * _q(right[k, j]) for k in range(left.shape[1])), Fraction(0))
        return _q(d.scale) * _q(self.f[0][i, j])


def needs_settling(ops) -> bool:
    """Whether the merge of ``ops`` adds a kind (or AdaLoRA's components), mixes W's columns (OFT, HRA), or scales
    W (IA3) and adds to it, whose float64 value may not round as its exact value does; and nothing else that the
    exact value here does not follow."""
    if ops is None or ops.replace is not None or ops.dora_magnitude is not None or ops.row_indices is not None:
        return False
    if any(isinstance(d, LowRank) and d.experts for d in ops.deltas):
        return False
    if isinstance(ops.multiply, (*MIXING, Pairs)):
        return True
    if ops.multiply is not None:  # IA3: W ⊙ l is exact in float64, the deltas added to it are not; W ⊘ l is not
        return bool(ops.deltas) or ops.multiply.inverse
    return any(isinstance(d, ADDITIVE) or isinstance(d, LowRank) and d.kind != "lora" for d in ops.deltas)


def view(d, device, cache: dict):
    key = ("view", id(d))
    if key not in cache:
        cache[key] = fouriermath.SpectrumRows(d, device) if isinstance(d, Spectrum) else RowsView(d, device)
    return cache[key]


def add_kind(v: torch.Tensor, d, start: int, stop: int, cache: dict) -> None:
    """Add an additive kind's rows [start, stop) to ``v`` (float64, the stored tensor's rows), in place."""
    flat = v.reshape(v.shape[0], -1)
    flat.add_(view(d, v.device, cache).value(start, stop))


def multiply(v: torch.Tensor, m, start: int, stop: int, cache: dict) -> None:
    """IA3: multiply rows [start, stop) (float64) by ``l`` along its axis, in place: exact in float64. OFT and HRA:
    mix each row's columns (``orthomath``)."""
    if isinstance(m, (*MIXING, Pairs)):
        transform(m, v.device, cache).apply(v, start)
        return
    factor = factors_along(m, v.dim(), start, stop, v.device, cache)
    if m.inverse:  # W ⊘ l (unmerge): rounded once in float64
        v.div_(factor)
    else:
        v.mul_(factor)


def factors_along(m: Scaling, ndim: int, start: int, stop: int, device, cache: dict) -> torch.Tensor:
    """IA3's ``l`` (float64) for rows [start, stop) of a stored tensor of ``ndim`` dimensions, shaped to broadcast
    along the axis it runs along; loaded once per ``cache``."""
    key = ("l", id(m))
    if key not in cache:
        cache[key] = m.l.load().to(device=device, dtype=torch.float64).reshape(-1)
    l = cache[key]  # noqa: E741
    if ndim == 1:
        return l[start:stop]
    if m.stored_axis(ndim) == 0:
        return l[start:stop].reshape(-1, *([1] * (ndim - 1)))
    return l.reshape(1, -1)


def transform(m, device, cache: dict):
    """The merge's arithmetic for one OFT, BOFT, HRA or RoAd target, made once per tensor."""
    key = ("transform", id(m))
    if key not in cache:
        cache[key] = roadmath.Paired(m, device) if isinstance(m, Pairs) else orthomath.transform(m, device)
    return cache[key]


class Base:
    """BASE's rows as the deltas find them: as they are, scaled (IA3: exact in float64), mixed (OFT, BOFT, HRA) or
    turned pairwise (RoAd), those with the bound on that computation's error; ``exact(i, j)`` the exact value in
    fractions, or for RoAd (``irrational``) ``interval(row, j, bits)``."""

    def __init__(self, m, w: torch.Tensor, y: torch.Tensor, start: int, cache: dict):
        self.m, self.start = m, start
        self.irrational = isinstance(m, Pairs)
        self.axis = m.stored_axis(w.dim()) if isinstance(m, Scaling) else 0
        w = w.reshape(y.shape).to(torch.float64)
        self.w, self.error = w, None
        self.from_result = False  # the magnitude from the merged rows y (and the deltas' taken twice): see settle
        if isinstance(m, (*MIXING, Pairs)):
            self.transform = transform(m, w.device, cache)
            self.error = self.transform.bound(w, start)
            # |f̃(W)| = |y − Σ Δ̃| ≤ |y| + Σ|Δ̃|: no second pass of the transform for its magnitude
            self.magnitude = y.abs().add_(self.error)
            self.from_result = True
            self._rows: dict[int, list[float]] = {}
        elif m is not None:
            value = w.clone()
            multiply(value, m, start, start + y.shape[0], cache)
            self.l = cache[("l", id(m))]
            self.magnitude = value.abs_()
            if m.inverse:  # W ⊘ l: the division's one rounding in float64
                self.error = self.magnitude * UNIT
        else:
            self.magnitude = w.abs()

    def interval(self, row: int, j: int, bits: int):
        """RoAd's exact value at stored row ``row``, column ``j``, as (center, radius)."""
        i = row - self.start
        partner = self.transform.partner_of(row) - self.start
        return self.transform.interval(self.w[i].tolist(), self.w[partner].tolist(), row, j, bits)

    def exact(self, i: int, j: int) -> Fraction:
        """Row ``i`` of the block, column ``j``."""
        m = self.m
        if isinstance(m, MIXING):
            if i not in self._rows:
                self._rows[i] = self.w[i].tolist()
            return self.transform.exact(self._rows[i], j, self.start + i)
        value = _q(self.w[i, j])
        if m is None:
            return value
        factor = _q(self.l[self.start + i if self.axis == 0 else j])
        return value / factor if m.inverse else value * factor


def settle(v: torch.Tensor, w: torch.Tensor, ops, start: int, stop: int, dtype: torch.dtype, cache: dict) -> int:
    """Make the float64 rows ``v`` (BASE's rows, multiplied, plus every delta of ``ops``) round to ``dtype`` as their
    exact values do: where the computation's error bound holds a rounding boundary, the exact value rounded to
    odd. Returns how many elements were decided exactly."""
    if dtype == torch.float64:
        return 0
    flat = v.reshape(v.shape[0], -1)
    width = flat.shape[1]
    views = [view(d, v.device, cache) for d in ops.deltas]
    base = Base(ops.multiply, w, flat, start, cache)
    magnitude = base.magnitude.clone()
    terms = 0
    for x in views:
        magnitude.add_(x.magnitude(start, stop), alpha=2 if base.from_result else 1)
        terms += getattr(x.d, "rank", 1)
    bound = magnitude.mul_((terms + 6) * 2 * UNIT).add_(flat.abs(), alpha=2 * UNIT)
    if base.error is not None:
        bound += base.error
    low, high = round_to(flat - bound, dtype), round_to(flat + bound, dtype)
    open_ = (low != high).reshape(-1).nonzero().reshape(-1).tolist()
    values = flat.reshape(-1)
    exact = [x for x in views if not hasattr(x, "interval")]
    approximate = [x for x in views if hasattr(x, "interval")] + ([base] if base.irrational else [])
    for k in open_:
        i, j = divmod(k, width)
        known = (Fraction(0) if base.irrational else base.exact(i, j)) \
            + sum((x.exact(start + i, j) for x in exact), Fraction(0))
        values[k] = _decided(known, approximate, start + i, j, dtype) if approximate else to_odd(known)
    return len(open_)


def _decided(known: Fraction, views, i: int, j: int, dtype: torch.dtype) -> float:
    """A double that rounds to ``dtype`` as ``known`` plus the views' irrational values at (i, j) do: their
    intervals narrowed until both ends round alike. Past 1024 bits the value is taken to be the rounding boundary
    between (a sum of cosines can be a rational midpoint exactly: cos 72° + cos 144° = −½)."""
    bits = 96
    while True:
        parts = [x.interval(i, j, bits) for x in views]
        center = known + sum((c for c, _ in parts), Fraction(0))
        radius = sum((r for _, r in parts), Fraction(0))
        ends = torch.tensor([to_odd(center - radius), to_odd(center + radius)], dtype=torch.float64)
        rounded = round_to(ends, dtype).to(torch.float64)
        if rounded[0] == rounded[1]:
            return float(ends[0])
        if bits >= 1024:
            return float((rounded[0] + rounded[1]) / 2)
        bits *= 2
