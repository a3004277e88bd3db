"""The check's own values of the adapter kinds of ``kinds.py``, in float64, apart from the merge's (``kindmath.py``).

LoHa's two products are taken as one product of rank r1·r2 (each term a pair of factors multiplied first); LoKr's
rows as a slice of torch's own ``kron`` over the few rows of the first factor they come from; IA3 by broadcasting.
Each gives, beside the value, the sum of the magnitudes of its terms at chosen elements, which the rounding bound
needs.
"""

from __future__ import annotations

import torch

from ..kinds import Hadamard, Kronecker, Scaling


def _factor(f, t):
    return f.get(t).reshape(t.shape[0], -1)


def kind_rows(d, f, start: int, stop: int):
    """(value, magnitude) of rows [start, stop) of the delta ``d`` on the stored tensor seen as rows × columns."""
    if isinstance(d, Hadamard):
        w1a, w1b, w2a, w2b = (_factor(f, t) for t in d.tensors())
        if d.transposed:  # stored rows are the logical columns
            w1a, w1b, w2a, w2b = w1b.T, w1a.T, w2b.T, w2a.T
        r1, r2 = w1a.shape[1], w2a.shape[1]
        left = (w1a[start:stop, :, None] * w2a[start:stop, None, :]).reshape(stop - start, r1 * r2)
        right = (w1b[:, None, :] * w2b[None, :, :]).reshape(r1 * r2, -1)
        return (left @ right) * d.scale, (left.abs() @ right.abs()) * abs(d.scale)
    if isinstance(d, Kronecker):
        w1, w2 = (_full(f, parts, False) for parts in (d.w1, d.w2))
        m1, m2 = (_full(f, parts, True) for parts in (d.w1, d.w2))
        if d.transposed:
            w1, w2, m1, m2 = w1.T, w2.T, m1.T, m2.T
        m = w2.shape[0]
        first, last = start // m, (stop - 1) // m + 1
        skip = start - first * m
        value = torch.kron(w1[first:last], w2)[skip:skip + stop - start] * d.scale
        magnitude = torch.kron(m1[first:last], m2)[skip:skip + stop - start] * abs(d.scale)
        return value, magnitude
    raise AssertionError(f"no check for the delta {d!r}")


def _full(f, parts, magnitude: bool):
    """A LoKr factor as a full matrix (of magnitudes: |a| @ |b| for a low-rank one)."""
    if len(parts) == 1:
        t = _factor(f, parts[0])
        return t.abs() if magnitude else t
    a, b = _factor(f, parts[0]), _factor(f, parts[1])
    return a.abs() @ b.abs() if magnitude else a @ b


def scaled(value, m: Scaling, f, start: int, stop: int) -> None:
    """IA3: ``value`` (rows [start, stop) of the stored tensor, float64) times its factors, in place."""
    l = f.get(m.l).reshape(-1)  # noqa: E741
    if value.dim() == 1:
        value.mul_(l[start:stop])
        return
    shape = [1] * value.dim()
    axis = m.stored_axis(value.dim())
    shape[axis] = -1
    value.mul_(l[start:stop].reshape(shape) if axis == 0 else l.reshape(shape))
