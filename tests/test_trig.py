"""The cosines FourierFT's exact step uses, against mpmath's (an independent arbitrary-precision library), and the
decision they feed: an element whose interval straddles a rounding boundary is narrowed until it does not."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch
from test_peft_oracle import round_bf16_reference

from lora_merge.kindmath import _decided
from lora_merge.trig import cos_turn

mpmath = pytest.importorskip("mpmath")


@pytest.mark.parametrize("bits", [64, 200, 600])
def test_cos_turn_holds_the_cosine(bits):
    rng = random.Random(bits)
    mpmath.mp.prec = bits + 64
    cases = [(0, 1), (1, 4), (1, 6), (1, 3), (5, 12), (7, 8), (1, 2), (3, 4)]
    cases += [(rng.randrange(0, 3 * q), q) for q in (rng.randrange(1, 10**9) for _ in range(200))]
    for p, q in cases:
        center, radius = cos_turn(p, q, bits)
        assert radius < Fraction(1, 2 ** (bits - 8))
        exact = mpmath.cos(2 * mpmath.pi * mpmath.mpf(p) / q)
        gap = abs(mpmath.mpf(center.numerator) / center.denominator - exact)
        slack = mpmath.mpf(2) ** -(bits + 48)  # mpmath's own rounding (its cos(π/2) is not exactly 0)
        assert gap <= mpmath.mpf(radius.numerator) / radius.denominator + slack, (p, q)


class Near:
    """A view whose value at every element is ``offset`` from a given point, held to within 2^-bits·8."""

    def __init__(self, offset: Fraction):
        self.offset = offset

    def interval(self, i, j, bits):
        return self.offset, Fraction(8, 2**bits)


def test_an_open_element_is_narrowed_until_decided():
    midpoint = Fraction(1) + Fraction(1, 2**8)  # halfway between bfloat16's 1 and 1 + 2^-7
    for offset, want in ((Fraction(-1, 2**300), 1.0), (Fraction(1, 2**300), 1 + 2**-7)):
        got = _decided(midpoint, [Near(offset)], 0, 0, torch.bfloat16)
        assert _bf16(got) == want


def test_a_value_on_the_boundary_rounds_as_a_tie():
    midpoint = Fraction(1) + Fraction(3, 2**8)  # between 1 + 2^-7 (odd) and 1 + 2^-6 (even): ties go up
    got = _decided(midpoint, [Near(Fraction(0))], 0, 0, torch.bfloat16)
    assert _bf16(got) == 1 + 2**-6


def _bf16(x: float) -> float:
    """Rounded once to bfloat16 (torch's own conversion from float64 rounds through float32, twice)."""
    return round_bf16_reference(torch.tensor([x], dtype=torch.float64)).item()
