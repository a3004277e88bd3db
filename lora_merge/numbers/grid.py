"""The small floating-point formats quantized checkpoints store their elements in, as grids of values.

A format is its sign, mantissa bits, smallest normal exponent and largest value (the FN formats have no
infinity). Its values at a scale ``s`` are the grid ``s·q``; the nearest grid value to ``x`` is computed
exactly in float64: the spacing of the grid at ``|x|`` is a power of two, so ``x / spacing`` is exact and
rounding it to the nearest integer (ties to even) is rounding to the nearest value of the format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


_EXPONENT_BITS = 0x7FF0000000000000  # of a float64


@dataclass(frozen=True)
class Grid:
    name: str
    mantissa: int  # explicit mantissa bits
    min_exponent: int  # of the smallest normal value
    largest: float

    def spacing(self, x: torch.Tensor) -> torch.Tensor:
        """The distance between neighbouring values of the format at each ``|x|`` (x float64, finite); beyond
        the largest value, the distance below it."""
        import torch

        # keeping only the exponent bits of a float64 gives 2^floor(log2|x|) (0 for 0)
        power = (x.view(torch.int64) & _EXPONENT_BITS).view(torch.float64)
        top = 2.0 ** (math.floor(math.log2(self.largest)) - self.mantissa)
        return power.mul_(2.0 ** -self.mantissa).clamp_(2.0 ** (self.min_exponent - self.mantissa), top)

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Each element of ``x`` (float64) rounded to the nearest value of the format, ties to even, values
        beyond the largest saturating to it."""
        step = self.spacing(x)
        return x.div(step).round_().mul_(step).clamp_(-self.largest, self.largest)


E4M3 = Grid("e4m3", 3, -6, 448.0)  # float8_e4m3fn
E2M1 = Grid("e2m1", 1, 0, 6.0)  # fp4, as MX formats store it

# e2m1 and float16 share their layout but for widths and bias: the code's three magnitude bits, placed at
# the top of float16's exponent and mantissa (and its sign at float16's), give the value times 2^-14
# (normal or subnormal alike), so codes and values convert through float16 without a table.
_E2M1_IN_FP16 = 2.0**-14


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes (uint8, 0..15) of values already on the e2m1 grid (the high bit is the sign)."""
    import torch

    bits = values.mul(_E2M1_IN_FP16).to(torch.float16).view(torch.int16)  # exact: 2 significant bits at most
    return (((bits >> 9) & 7) | ((bits >> 12) & 8)).to(torch.uint8)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """The float64 values of 4-bit codes (uint8, 0..15)."""
    import torch

    c = codes.to(torch.int16)
    bits = ((c & 7) << 9) | ((c & 8) << 12)
    return bits.view(torch.float16).to(torch.float64).mul_(1 / _E2M1_IN_FP16)


def smallest_power_of_two(x: torch.Tensor, top: float) -> torch.Tensor:
    """The exponent of the smallest power of two ``s`` with ``x <= top·s`` (x float64, positive)."""
    import torch

    _, e = torch.frexp(x / top)  # x/top = m·2^e, m in [0.5, 1): 2^(e-1) < x/top <= 2^e (up to rounding)
    e = e.to(torch.int64)
    below = x <= top * torch.ldexp(torch.ones_like(x), e - 1)  # x/top was exactly 2^(e-1), or rounded up to it
    return torch.where(below, e - 1, e)
