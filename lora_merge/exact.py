"""The exact value of a merged element, for the elements whose error bounds leave them too close to a rounding
boundary to call: one that lands exactly on a midpoint (as many do when the adapter's factors are bfloat16 values),
or within float64's own error of one.

Every input is a dyadic rational (BASE's element, float32 factors, float64 scales), so once each product
``scale · L · R`` is split exactly into its rounding and its error, the exact value is a finite sum of doubles.
``kernels.exact`` sums those terms exactly (in C, or ``math.fsum`` in numpy) and rounds the sum to odd: the exact
value where it is a double, else of its two neighbouring doubles the one whose last bit is odd. A boundary of every
rounding the merge makes (a midpoint of bfloat16, float16 or float32 values, of FP8 or MXFP4 codes at a scale, the
bound where a block's fresh scale steps) is a double of at most 52 significant bits, an even one, so it is never
the odd double and the exact value and its odd rounding always lie on the same side of it: rounding the latter
gives the rounding of the former, ties included.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from . import kernels


class ExactSums:
    """``w + Σ_k scales[k] · left[i, k] · right[j, k]`` at the elements (i, j) = divmod(flat, width) of a block,
    rounded to odd: ``left`` (rows × r) and ``right`` (width × r) the adapter's own factors as float32 values,
    ``scales`` each column's scale."""

    def __init__(self, left: np.ndarray, right: np.ndarray, scales: np.ndarray, width: int):
        self.left = np.ascontiguousarray(left, np.float32)
        self.right = np.ascontiguousarray(right, np.float32)
        self.scales = np.ascontiguousarray(scales, np.float64)
        self.width = width
        self.fractions = 0  # elements whose products lie beyond doubles' range, summed in fractions instead

    def __call__(self, flat: np.ndarray, w: np.ndarray) -> np.ndarray:
        """The exact value at each flat index (``w`` BASE's elements there, as float64), rounded to odd: 0 only
        where the value is, of its sign elsewhere."""
        flat = np.ascontiguousarray(flat, np.int64)
        w = np.ascontiguousarray(w, np.float64)
        out = np.empty(len(flat))
        kernels.exact(flat, self.width, self.left, self.right, self.scales, w, out)
        for k in np.flatnonzero(np.isnan(out)):  # a product's rounding error below doubles' range (a scale < 2^-600)
            out[k] = to_odd(self._fraction(int(flat[k]), float(w[k])))
            self.fractions += 1
        return out

    def _fraction(self, f: int, w: float) -> Fraction:
        i, j = divmod(f, self.width)
        return Fraction(w) + sum((Fraction(float(s)) * Fraction(float(a)) * Fraction(float(b))
                                  for s, a, b in zip(self.scales, self.left[i], self.right[j], strict=True)), Fraction(0))


def to_odd(q: Fraction) -> float:
    """The rational ``q`` rounded to odd (past the largest double: infinity)."""
    try:
        nearest = float(q)  # correctly rounded
    except OverflowError:
        return math.copysign(math.inf, q)
    if Fraction(nearest) != q and int(np.float64(nearest).view(np.uint64)) & 1 == 0:
        return math.nextafter(nearest, math.inf if q > nearest else -math.inf)
    return nearest
