"""The merge arithmetic: pure functions over tensors.

Everything is computed in float64 and rounded once to the output dtype. float64 holds every product
of two float32 (or bfloat16/float16) factors exactly, so the only error before the final rounding is
float64's own (about 2^-53 relative), far below half a unit in the last place of float32, bfloat16
or float16. torch converts float64 to bfloat16/float16 through float32, which rounds twice;
``round_to`` finds the elements where that can differ and rounds those via round-to-odd.
"""

from __future__ import annotations

import math
import sys

import torch

from .adapter import AddScaled, LowRank
from .buffers import Buffers, flat_nonzero


def round_to(x: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None,
             buffers: Buffers | None = None) -> torch.Tensor:
    """Round a float64 tensor to ``dtype`` once, to nearest even (into ``out`` when given; ``buffers`` holds
    the float32 step, reused from call to call)."""
    if dtype == torch.float64:
        return out.copy_(x) if out is not None else x
    x32 = buffers.take("round32", tuple(x.shape), torch.float32) if buffers is not None else None
    x32 = x32.copy_(x) if x32 is not None else x.to(torch.float32)
    if dtype == torch.float32:
        return out.copy_(x32) if out is not None else x32
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"cannot round to {dtype}")
    if x.device.type != "cpu":  # on a GPU every element goes through round-to-odd: no host round trip
        y = _round_via_odd(x, dtype)
        return out.copy_(y) if out is not None else y
    # Rounding through float32 can only go wrong where the float32 value lands exactly on a halfway
    # point of ``dtype``: rounding cannot carry a value across a point that float32 represents. Those
    # few elements (and float16's subnormal range, whose halfway points sit elsewhere) are redone.
    y = out.copy_(x32) if out is not None else x32.to(dtype)
    if dtype == torch.bfloat16:
        suspect = low_halves(x32) == -0x8000  # the 16 bits bfloat16 drops are exactly 0x8000
    else:
        suspect = ((x32.view(torch.int32) & 0x1FFF) == 0x1000) | (x32.abs() < 2.0**-14)
    where = flat_nonzero(suspect)
    if where.numel():
        y.view(-1)[where] = _round_via_odd(x.reshape(-1)[where], dtype)
    return y


def low_halves(x32: torch.Tensor) -> torch.Tensor:
    """The low 16 bits of each float32, as int16: a strided view, no copy."""
    halves = x32.reshape(-1).view(torch.int16)
    return halves[0::2] if sys.byteorder == "little" else halves[1::2]


def _round_via_odd(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to ``dtype`` via round-to-odd in float32: with 13+ spare bits, rounding that to nearest
    even is the same as rounding x directly. Slower; used where the plain path may round twice."""
    x32 = x.to(torch.float32)
    back = x32.to(torch.float64)
    fix = (back != x) & ((x32.view(torch.int32) & 1) == 0)
    if bool(fix.any()):
        toward = torch.where(x > back, torch.inf, -torch.inf).to(torch.float32)
        x32 = torch.where(fix, torch.nextafter(x32, toward), x32)
    return x32.to(dtype)


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in a floating-point tensor (one min/max pass: NaN propagates, Inf shows at an end)."""
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _factors(d: LowRank, device: torch.device, cache: dict):
    """A (r × in) and B (out × r) as float64 on ``device``, flattened over conv kernel dims."""
    key = id(d)
    if key not in cache:
        a = d.a.load().to(device=device, dtype=torch.float64)
        b = d.b.load().to(device=device, dtype=torch.float64)
        if d.experts:
            e = d.experts
            # peft's ParamWrapper: A is (E·r, in) expert-major; B is (out, r·E) with the expert index fastest.
            a = a.reshape(e, -1, a.shape[-1])  # (E, r, in)
            b = b.reshape(b.shape[0], -1, e).permute(2, 0, 1).contiguous()  # (E, out, r)
        else:
            a = a.reshape(a.shape[0], -1)
            b = b.reshape(b.shape[0], -1)
        cache[key] = (a, b)
    return cache[key]


def add_delta(w: torch.Tensor, d: LowRank | AddScaled, start: int, stop: int, cache: dict) -> None:
    """Add one LoRA delta (or a bias's) to rows [start, stop) of the stored tensor, held as float64 in ``w`` (in
    place); the other kinds' deltas are ``kindmath.add_kind``'s."""
    if isinstance(d, AddScaled):
        if id(d) not in cache:
            cache[id(d)] = d.t.load().to(device=w.device, dtype=torch.float64)
        w.add_(cache[id(d)][start:stop], alpha=d.scale)
        return
    a, b = _factors(d, w.device, cache)
    if d.experts:
        for i, e in enumerate(range(start, stop)):
            if d.transposed:  # stored (E, in, out)
                w[i].addmm_(a[e].T, b[e].T, alpha=d.scale)
            else:  # stored (E, out, in)
                w[i].addmm_(b[e], a[e], alpha=d.scale)
        return
    flat = w.reshape(w.shape[0], -1)
    if d.transposed:  # stored (in × out): rows of the stored tensor are columns of B @ A
        flat.addmm_(a[:, start:stop].T, b.T, alpha=d.scale)
    else:
        flat.addmm_(b[start:stop], a, alpha=d.scale)


def row_norms(v: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row over every dimension but the first."""
    return v.reshape(v.shape[0], -1).square().sum(dim=1).sqrt()


def column_sumsq(v: torch.Tensor) -> torch.Tensor:
    """Sum of squares of each column of a 2-D block (the logical rows of a transposed tensor)."""
    return v.square().sum(dim=0)


def apply_dora(v: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, transposed: bool) -> None:
    """``W' = m / ‖V‖ · V`` with the norm of each logical output row, in place."""
    factor = magnitude.to(torch.float64) / norm
    if transposed:
        v.mul_(factor.reshape(1, -1))
    else:
        v.mul_(factor.reshape(-1, *([1] * (v.dim() - 1))))


def replace_rows(v: torch.Tensor, indices: list[int], rows: torch.Tensor, start: int, stop: int) -> None:
    """Overwrite the listed rows that fall in [start, stop) (trainable tokens)."""
    for j, idx in enumerate(indices):
        if start <= idx < stop:
            v[idx - start] = rows[j].to(v.device, torch.float64)
