"""The adapter kinds beyond LoRA's low-rank product, as canonical operations on one base tensor.

Additive kinds give ``W' = W + ΔW`` with ΔW a short polynomial of the adapter's own values: LoHa (a Hadamard
product of two low-rank products) and LoKr (a Kronecker product of two factors, each full or low-rank). AdaLoRA
is LoRA with a scale per rank component, so ``formats/peft_kinds.py`` reads it as rank-one ``LowRank`` deltas.
Multiplicative kinds give ``W' = f(W)``: IA3 multiplies W by a vector along its rows or its columns.

Like ``LowRank``, each states its delta against the *logical* matrix (out × in, convolution kernels flattened),
and ``fit`` decides how the stored tensor holds it. The arithmetic is elsewhere: the merge's in ``kindmath.py``,
the check's own in ``check/kinds.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


def orient(what: str, out: int, inn: int, shape: tuple[int, ...], transposed: bool | None,
           fan_in_fan_out: bool) -> bool | str:
    """Whether a logical (out × in) delta is stored transposed in a tensor of ``shape``, or why it does not fit."""
    w_shape = tuple(shape)
    if len(w_shape) > 2:  # a convolution kernel: (out, in, k…), its logical matrix (out, in·k…)
        if w_shape[0] == out and math.prod(w_shape[1:]) == inn and not transposed:
            return False
        return f"{what} gives a kernel of {out} × {inn} but the base tensor is {list(w_shape)}"
    straight, turned = w_shape == (out, inn), w_shape == (inn, out)
    if transposed is not None:
        straight, turned = straight and not transposed, turned and transposed
    if straight and turned:  # square: only the layer type tells, as in peft
        return fan_in_fan_out
    if straight or turned:
        return turned
    return f"{what} gives shape {[out, inn]} but the base tensor is {list(w_shape)}"


@dataclass(frozen=True)
class Hadamard:
    """LoHa: ``ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b)``; w1a (out × r), w1b (r × in), w2a, w2b alike."""

    w1a: object
    w1b: object
    w2a: object
    w2b: object
    scale: float
    transposed: bool | None = None

    name = "loha"

    @property
    def logical(self) -> tuple[int, int]:
        return self.w1a.shape[0], math.prod(self.w1b.shape[1:])

    @property
    def rank(self) -> int:
        return self.w1a.shape[1] + self.w2a.shape[1]

    def tensors(self):
        return self.w1a, self.w1b, self.w2a, self.w2b

    def problem(self) -> str | None:
        (o1, r1), (o2, r2) = self.w1a.shape[:2], self.w2a.shape[:2]
        if (o1, r1) != (o2, r2) or self.w1b.shape[0] != r1 or tuple(self.w1b.shape) != tuple(self.w2b.shape):
            return (f"LoHa factors {[list(t.shape) for t in self.tensors()]} do not compose "
                    "(hada_w1_a @ hada_w1_b and hada_w2_a @ hada_w2_b of one shape)")
        return None

    def fit(self, shape, fan_in_fan_out: bool = False):
        found = self.problem() or orient("LoHa", *self.logical, shape, self.transposed, fan_in_fan_out)
        return found if isinstance(found, str) else replace(self, transposed=found)

    def describe(self) -> str:
        return f"loha(r={self.w1a.shape[1]}, s={self.scale:g}{', T' if self.transposed else ''})"


@dataclass(frozen=True)
class Kronecker:
    """LoKr: ``ΔW = scale · kron(w1, w2)``, each factor a full matrix (one tensor) or a low-rank product (two)."""

    w1: tuple
    w2: tuple
    scale: float
    transposed: bool | None = None

    name = "lokr"

    @staticmethod
    def factor_shape(parts: tuple) -> tuple[int, int]:
        return (parts[0].shape[0], parts[0].shape[1]) if len(parts) == 1 else (parts[0].shape[0], parts[1].shape[1])

    @property
    def logical(self) -> tuple[int, int]:
        (p, q), (m, n) = self.factor_shape(self.w1), self.factor_shape(self.w2)
        return p * m, q * n

    @property
    def rank(self) -> int:
        """The roundings in one element's computation: the inner sizes of its factors (1 for a full one), summed."""
        return sum(parts[0].shape[1] if len(parts) == 2 else 1 for parts in (self.w1, self.w2))

    def tensors(self):
        return (*self.w1, *self.w2)

    def problem(self) -> str | None:
        for parts in (self.w1, self.w2):
            if any(len(t.shape) != 2 for t in parts) or len(parts) == 2 and parts[0].shape[1] != parts[1].shape[0]:
                return (f"LoKr factors {[list(t.shape) for t in self.tensors()]} are not matrices that compose "
                        "(a convolution's CP or 4-D form is not merged yet)")
        return None

    def fit(self, shape, fan_in_fan_out: bool = False):
        found = self.problem() or orient("LoKr", *self.logical, shape, self.transposed, fan_in_fan_out)
        return found if isinstance(found, str) else replace(self, transposed=found)

    def describe(self) -> str:
        forms = "".join("f" if len(p) == 1 else "r" for p in (self.w1, self.w2))
        return f"lokr({forms}, s={self.scale:g}{', T' if self.transposed else ''})"


ADDITIVE = (Hadamard, Kronecker)


@dataclass(frozen=True)
class Scaling:
    """IA3: W' = W ⊙ l, ``l`` one factor per logical row (``columns`` False) or per logical column (True); on a
    bias (1-D), one per element."""

    l: object  # noqa: E741 (peft's name)
    columns: bool
    transposed: bool | None = None

    name = "ia3"

    def tensors(self):
        return (self.l,)

    def fit(self, shape, fan_in_fan_out: bool = False):
        size = math.prod(self.l.shape)
        if len(shape) == 1:
            return self if shape[0] == size and not self.columns else \
                f"IA3's {size} factors do not fit a bias of {list(shape)}"
        if len(shape) != 2:
            return f"IA3 on a {len(shape)}-D tensor {list(shape)} is not merged yet"
        turned = fan_in_fan_out  # peft's Conv1D layers store W as in × out
        rows = shape[1] if turned else shape[0]
        cols = shape[0] if turned else shape[1]
        if size != (cols if self.columns else rows):
            what = "input columns" if self.columns else "output rows"
            return f"IA3 has {size} factors but the base tensor {list(shape)} has {cols if self.columns else rows} {what}"
        return replace(self, transposed=turned)

    def stored_axis(self, ndim: int) -> int:
        """The stored tensor's axis that ``l`` runs along."""
        if ndim == 1:
            return 0
        return 1 if self.columns != bool(self.transposed) else 0

    def describe(self) -> str:
        return f"ia3({'columns' if self.columns else 'rows'}{', T' if self.transposed else ''})"
