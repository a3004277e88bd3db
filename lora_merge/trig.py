"""Cosines of rational multiples of a full turn, cos(2π·p/q), to any precision, as intervals that surely hold them.

The merge's exact step needs them where FourierFT's float64 value leaves an element's rounding open: the exact value
is then a sum of such cosines, and an interval narrower than the distance to the rounding boundary decides it.
Everything is integer arithmetic on values scaled by 2^bits: π by Machin's formula, the angle reduced to [0, π/2]
by the cosine's symmetries on the fraction p/q itself (exact), and the Taylor series, whose every truncation is
counted in the error.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache


@lru_cache(maxsize=8)
def _pi(bits: int) -> int:
    """π·2^bits, within 2^-bits·8 of it (each arctan series truncated and floored, its terms counted)."""
    one = 1 << (bits + 8)

    def arctan_inv(x: int) -> int:  # arctan(1/x)·2^(bits+8), alternating series
        total, power, k, sign = 0, one // x, 1, 1
        while power:
            total += sign * (power // k)
            power //= x * x
            k += 2
            sign = -sign
        return total

    return (16 * arctan_inv(5) - 4 * arctan_inv(239)) >> 8


def cos_turn(p: int, q: int, bits: int) -> tuple[Fraction, Fraction]:
    """(center, radius): cos(2π·p/q) lies within radius of center; the radius is below 2^-(bits − 8)."""
    f = Fraction(p % q, q)  # of a turn, in [0, 1)
    if f > Fraction(1, 2):
        f = 1 - f  # cos(2π(1 − f)) = cos(2πf)
    sign = 1
    if f > Fraction(1, 4):
        f, sign = Fraction(1, 2) - f, -1  # cos(2π(½ − f)) = −cos(2πf)
    if f == 0:
        return Fraction(sign), Fraction(0)
    if f == Fraction(1, 4):
        return Fraction(0), Fraction(0)
    if f == Fraction(1, 6):
        return Fraction(sign, 2), Fraction(0)
    scale = 1 << bits
    # x = 2π·f·2^bits, floored: off by under 1 + 2π·8 units of 2^-bits
    x = (2 * _pi(bits) * f.numerator) // f.denominator
    x2 = x * x >> bits
    total, term, k = scale, scale, 0  # Σ (−x²)^k / (2k)!, each term floored once from the last
    while term:
        k += 1
        term = term * x2 // (scale * (2 * k - 1) * (2 * k))
        total += -term if k % 2 else term
    # the terms' floors (≤ 1 unit each, and x²'s), the series' tail (< its last term), and x's own error (|sin| ≤ 1)
    error = 2 * (k + 2) + 60
    return Fraction(sign * total, scale), Fraction(error, scale)


def cos_sin(x: Fraction, bits: int) -> tuple[tuple[Fraction, Fraction], tuple[Fraction, Fraction]]:
    """((center, radius) of cos x, (center, radius) of sin x) for a rational x (a stored angle, in radians):
    x less the nearest multiple k of π/2 (π known to 2^-bits·8, times |k| + 1), then both Taylor series."""
    scale = 1 << bits
    half_pi = Fraction(_pi(bits), 2 * scale)
    k = round(x / half_pi)
    r = x - k * half_pi  # |r| ≤ π/4 and a little; off by |k|·4·2^-bits at most
    shift = Fraction(4 * abs(k) + 4, scale)
    sign = -1 if r < 0 else 1  # the series on |r|: floors of positive terms end at zero
    big = int(abs(r) * scale)  # off by one unit more
    r2 = big * big >> bits
    cos_t = sin_t = 0
    term_c, term_s, n = scale, big, 0
    while term_c or term_s:
        cos_t += -term_c if n % 2 else term_c
        sin_t += -term_s if n % 2 else term_s
        n += 1
        term_c = term_c * r2 // (scale * (2 * n - 1) * (2 * n))
        term_s = term_s * r2 // (scale * (2 * n) * (2 * n + 1))
    error = Fraction(2 * (n + 2) + 8, scale) + shift  # the floors, the tails, and r's own error (|d/dr| ≤ 1)
    c, s = Fraction(cos_t, scale), Fraction(sign * sin_t, scale)
    c, s = [(c, s), (-s, c), (-c, -s), (s, -c)][k % 4]  # cos(r + kπ/2), sin(r + kπ/2)
    return (c, error), (s, error)
