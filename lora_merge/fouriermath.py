"""The merge's arithmetic for FourierFT (``kinds.Spectrum``): its delta's rows in float64, and intervals that surely
hold each element's exact value, as narrow as asked.

``ΔW[i, j] = K · Σₖ cₖ cos(2π(uₖi/M + vₖj/N))``, K = scale / (M·N), taken apart as
``Σₖ cₖ cos αᵢₖ cos βₖⱼ − cₖ sin αᵢₖ sin βₖⱼ``: one product of a (rows × 2n) and a (2n × N) matrix. Each angle is
2π times an exact fraction of a turn ((uₖ·i mod M) / M, computed in integers), so every trigonometric value is within
a few units of float64's roundoff of the exact one (torch's cos and sin err by at most an ulp or two); the bound on
an element is K·Σ|cₖ| times the count of terms and roundings (``Spectrum.rank``). Near a rounding boundary the exact
value is a sum of cosines of rational multiples of a turn, irrational in general: ``trig.cos_turn`` gives each as a
narrow interval, and the interval of the sum decides the rounding once it is narrow enough.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from .kinds import Spectrum
from .trig import cos_turn


class SpectrumRows:
    """One FourierFT delta as the stored tensor sees it (a transposed one's rows and columns swapped)."""

    def __init__(self, d: Spectrum, device):
        self.d = d
        u, v = d.positions()
        (m, n) = d.size
        if d.transposed:  # stored (i, j) is logical (j, i): the sum is symmetric in the two roles
            u, v, m, n = v, u, n, m
        self.u, self.v, self.m, self.n = u.tolist(), v.tolist(), m, n
        c = d.spectrum.load().to(device=device, dtype=torch.float64).reshape(-1)
        self.c = c.tolist()
        self.k = Fraction(float(d.scale)) / (m * n)
        scaled = c * (float(d.scale) / (m * n))
        self.total = float(scaled.abs().sum())
        beta = _angles(v.to(device), n, torch.arange(n, device=device))  # (terms × N)
        self.right = torch.cat([beta.cos(), beta.sin()])
        self.left_scale = scaled
        self.rows_u = u.to(device)

    def magnitude(self, start: int, stop: int) -> torch.Tensor:
        """K·Σ|cₖ|, at least Σ|terms| of every element (|cos| ≤ 1)."""
        return torch.full((stop - start, 1), self.total, dtype=torch.float64, device=self.right.device)

    def value(self, start: int, stop: int) -> torch.Tensor:
        alpha = _angles(self.rows_u, self.m, torch.arange(start, stop, device=self.right.device)).T  # (rows × terms)
        left = torch.cat([alpha.cos() * self.left_scale, -alpha.sin() * self.left_scale], dim=1)
        return left @ self.right

    def interval(self, i: int, j: int, bits: int) -> tuple[Fraction, Fraction]:
        """(center, radius) of the exact ΔW[i, j]."""
        q = self.m * self.n
        center = radius = Fraction(0)
        for u, v, c in zip(self.u, self.v, self.c):
            mid, r = cos_turn(u * i * self.n + v * j * self.m, q, bits)
            center += Fraction(c) * mid
            radius += abs(Fraction(c)) * r
        return self.k * center, abs(self.k) * radius


def _angles(freq: torch.Tensor, size: int, at: torch.Tensor) -> torch.Tensor:
    """2π·((freqₖ·x) mod size) / size for each frequency k and position x: (terms × positions), the turn exact."""
    turns = (freq[:, None].to(torch.int64) * at[None, :].to(torch.int64)) % size
    return turns.to(torch.float64) / size * (2 * math.pi)
