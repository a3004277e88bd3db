"""The merge's arithmetic for RoAd (``transforms.Pairs``): each pair of rows i and its partner p (i ± group/2, in the
same group) turned into ``fᵢ·W[i] ± sᵢ·W[p]``, rounded once from the exact value.

f = α₁ cos θ₁ and s = α₂ sin θ₂ are computed in float64 (torch's cos and sin within two ulps), so each merged
element errs by at most 8u·(|α₁||W[i]| + |α₂||W[p]|) before its own rounding. Where that leaves the rounding to the
output dtype open, the exact value, irrational in general, is held in an interval (``trig.cos_sin`` of the stored
angle) narrowed until its rounding is decided. Row blocks hold whole groups (``Pairs.row_unit``), so every partner
is in the block.
"""

from __future__ import annotations

from fractions import Fraction

import torch

from .transforms import Pairs
from .trig import cos_sin

UNIT = 2.0**-53


class Paired:
    """One RoAd target: f, s and the sign of each row's partner term, in float64."""

    def __init__(self, m: Pairs, device):
        load = lambda t: t.load().to(device=device, dtype=torch.float64).reshape(-1)  # noqa: E731
        self.a1, self.t1, self.a2, self.t2 = m.per_row(load(m.theta), load(m.alpha))
        self.f, self.s = self.a1 * self.t1.cos(), self.a2 * self.t2.sin()
        h = m.group // 2
        first = (torch.arange(len(self.f), device=device) % m.group) < h
        self.sign = torch.where(first, -1.0, 1.0).to(torch.float64)  # −s·W[i + h] in a group's first half
        self.half = h
        self._angles: dict[tuple[int, int], tuple] = {}

    def _partner(self, v: torch.Tensor) -> torch.Tensor:
        """Each row's partner row (the block holds whole groups): the halves of every group swapped."""
        rows = v.shape[0]
        grouped = v.reshape(rows // (2 * self.half), 2, self.half, -1)
        return grouped.flip(1).reshape(v.shape)

    def apply(self, v: torch.Tensor, start: int) -> None:
        """Rows ``v`` (float64, from row ``start``, whole groups) turned pairwise, in place."""
        rows = v.shape[0]
        flat = v.reshape(rows, -1)
        turned = flat * self.f[start:start + rows, None] + self._partner(flat) * (self.s * self.sign)[start:start + rows, None]
        flat.copy_(turned)

    def bound(self, w: torch.Tensor, start: int) -> torch.Tensor:
        """Each merged element's error bound, from BASE's rows ``w`` (float64) from row ``start``."""
        rows = w.shape[0]
        flat = w.reshape(rows, -1).abs()
        near = flat * self.a1[start:start + rows, None].abs() + self._partner(flat) * self.a2[start:start + rows, None].abs()
        return near.mul_(8 * UNIT).reshape(w.shape)

    def partner_of(self, row: int) -> int:
        return row + self.half if row % (2 * self.half) < self.half else row - self.half

    def interval(self, w_row: list[float], w_partner: list[float], row: int, j: int, bits: int):
        """(center, radius) of the exact merged value at (row, j)."""
        key = (row, bits)
        if key not in self._angles:
            (c, rc), _ = cos_sin(Fraction(float(self.t1[row])), bits)
            _, (s, rs) = cos_sin(Fraction(float(self.t2[row])), bits)
            a1, a2 = Fraction(float(self.a1[row])), Fraction(float(self.a2[row])) * int(self.sign[row])
            self._angles[key] = (a1 * c, abs(a1) * rc, a2 * s, abs(a2) * rs)
        fc, fr, sc, sr = self._angles[key]
        w, p = Fraction(w_row[j]), Fraction(w_partner[j])
        return w * fc + p * sc, abs(w) * fr + abs(p) * sr
