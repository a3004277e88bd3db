"""The additive adapter kinds beyond LoRA's low-rank product, as canonical operations on one base tensor.

Each gives ``W' = W + ΔW`` with ΔW computed from the adapter's own values: LoHa (a Hadamard product of two
low-rank products, or of their CP forms), LoKr (a Kronecker product of two factors, each full, low-rank or CP), VeRA
(scaled slices of shared projections: a ``LowRank`` once fitted), MiSS (a block tiled over W) and FourierFT (a sparse
spectrum's inverse FFT). AdaLoRA is LoRA with a scale per rank component, so ``formats/peft_kinds.py`` reads it as
rank-one ``LowRank`` deltas. The kinds that transform W itself (IA3, OFT, BOFT, HRA, RoAd) are in ``transforms.py``.

Like ``LowRank``, each states its delta against the *logical* matrix (out × in, convolution kernels flattened),
and ``fit`` decides how the stored tensor holds it. The arithmetic is elsewhere: the merge's in ``kindmath.py``,
the check's own in ``check/kinds.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache


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


def factor_shape(parts: tuple) -> tuple[int, int]:
    """A factor's logical (rows × columns, a kernel's columns flattened): ``(full,)`` a matrix or kernel;
    ``(a, b)`` a low-rank product a (rows × r) @ b (r × columns…); ``(t, a, b)`` the CP form of a convolution,
    ``F[p, c, k, l] = Σᵢⱼ t[i, j, k, l] · a[i, p] · b[j, c]`` with t (r × r × k × l), a (r × out), b (r × in)."""
    if len(parts) == 1:
        return parts[0].shape[0], math.prod(parts[0].shape[1:])
    if len(parts) == 2:
        return parts[0].shape[0], math.prod(parts[1].shape[1:])
    t, a, b = parts
    return a.shape[1], b.shape[1] * math.prod(t.shape[2:])


def factor_terms(parts: tuple) -> int:
    """The products summed in one element of the factor: 1, r, or r² for the CP form."""
    return 1 if len(parts) == 1 else parts[0].shape[1] if len(parts) == 2 else parts[0].shape[0] * parts[0].shape[1]


def factor_problem(parts: tuple) -> str | None:
    if len(parts) == 2:
        a, b = parts
        if len(a.shape) != 2 or len(b.shape) < 2 or a.shape[1] != b.shape[0]:
            return "a low-rank product whose factors do not compose"
    elif len(parts) == 3:
        t, a, b = parts
        if len(t.shape) != 4 or len(a.shape) != 2 or len(b.shape) != 2 or (a.shape[0], b.shape[0]) != t.shape[:2]:
            return "a CP form whose core and factors do not compose"
    elif len(parts[0].shape) not in (2, 4):
        return "a factor that is neither a matrix nor a 2-D convolution kernel"
    return None


def _shapes(*factors) -> list:
    return [[list(t.shape) for t in parts] for parts in factors]


@dataclass(frozen=True)
class _TwoFactors:
    """What LoHa and LoKr share: two factors, each a tuple of tensors (``factor_shape``), an element's roundings
    (the products in each factor's element, summed), and how the delta fits a stored tensor: a factor that only a
    convolution kernel holds (``kernel_only``) is never transposed."""

    w1: tuple
    w2: tuple
    scale: float
    transposed: bool | None = None

    label = ""  # the kind, as messages name it
    kernel_message = ""  # why a transposed fit is refused where ``kernel_only``

    @property
    def rank(self) -> int:
        return factor_terms(self.w1) + factor_terms(self.w2)

    def tensors(self):
        return (*self.w1, *self.w2)

    def fit(self, shape, fan_in_fan_out: bool = False):
        found = self.problem() or orient(self.label, *self.logical, shape, self.transposed, fan_in_fan_out)
        if found is True and self.kernel_only():
            return self.kernel_message
        return found if isinstance(found, str) else replace(self, transposed=found)


@dataclass(frozen=True)
class Hadamard(_TwoFactors):
    """LoHa: ``ΔW = scale · F1 ⊙ F2``, each factor a low-rank product (hada_wN_a @ hada_wN_b) or, for a
    convolution, its CP form (hada_tN with hada_wN_a, hada_wN_b)."""

    name = "loha"
    label = "LoHa"
    kernel_message = "LoHa's CP form fits a convolution kernel, not a transposed matrix"

    @property
    def logical(self) -> tuple[int, int]:
        return factor_shape(self.w1)

    def kernel_only(self) -> bool:
        return 3 in (len(self.w1), len(self.w2))

    def problem(self) -> str | None:
        found = factor_problem(self.w1) or factor_problem(self.w2)
        if found or len(self.w1) == 1 or len(self.w2) == 1 or factor_shape(self.w1) != factor_shape(self.w2):
            return (f"LoHa factors {_shapes(self.w1, self.w2)} do not compose ({found or 'two products of one shape'})")
        return None

    def describe(self) -> str:
        cp = ", cp" if len(self.w1) == 3 else ""
        return f"loha(r={self.w1[0].shape[len(self.w1) % 2]}{cp}, s={self.scale:g}{', T' if self.transposed else ''})"


@dataclass(frozen=True)
class Kronecker(_TwoFactors):
    """LoKr: ``ΔW = scale · kron(w1, w2)``; w1 a full matrix or a low-rank product; w2 a full matrix or kernel, a
    low-rank product, or a convolution's CP form. A kernel's (k, l) run fastest in each of W's input columns, so
    the Kronecker product of the flattened factors is the flattened kernel."""

    name = "lokr"
    label = "LoKr"
    kernel_message = "LoKr's convolution factor fits a kernel, not a transposed matrix"

    @property
    def logical(self) -> tuple[int, int]:
        (p, q), (m, n) = factor_shape(self.w1), factor_shape(self.w2)
        return p * m, q * n

    def kernel_only(self) -> bool:
        return len(self.w2) == 3 or len(self.w2[-1].shape) != 2

    def problem(self) -> str | None:
        found = factor_problem(self.w1) or factor_problem(self.w2)
        if found or len(self.w1) == 3 or len(self.w1[-1].shape) != 2:
            return f"LoKr factors {_shapes(self.w1, self.w2)} do not compose ({found or 'w1 is a matrix'})"
        return None

    def describe(self) -> str:
        forms = "".join({1: "f", 2: "r", 3: "c"}[len(p)] for p in (self.w1, self.w2))
        return f"lokr({forms}, s={self.scale:g}{', T' if self.transposed else ''})"


@dataclass(frozen=True)
class Vera:
    """VeRA: ``ΔW = (λ_b ⊙ B[:out]) @ (λ_d ⊙ A[:, :in])``: A (r × max in) and B (max out × r) shared by every
    layer, sliced to the layer's size, and scaled by the layer's own vectors ``lambda_b`` (out) and ``lambda_d``
    (r), held here as float64 values (each product of two stored values is exact in float64). The layer's input
    size is the base tensor's, so ``fit`` gives a ``LowRank`` of the scaled slices."""

    a: object
    b: object
    lambda_b: object
    lambda_d: object
    scale: float = 1.0  # 1, or an adapter's weight

    name = "vera"

    def tensors(self):
        return self.a, self.b

    def problem(self) -> str | None:
        r = self.a.shape[0]
        if len(self.a.shape) != 2 or len(self.b.shape) != 2 or self.b.shape[1] != r or len(self.lambda_d) != r \
                or len(self.lambda_b) > self.b.shape[0]:
            return (f"VeRA's vera_A{list(self.a.shape)}, vera_B{list(self.b.shape)}, lambda_b[{len(self.lambda_b)}] "
                    f"and lambda_d[{len(self.lambda_d)}] do not compose")
        return None

    def fit(self, shape, fan_in_fan_out: bool = False):
        from .adapter import DerivedTensor, LowRank

        found = self.problem()
        if found:
            return found
        out, r, widest = len(self.lambda_b), self.a.shape[0], self.a.shape[1]
        if len(shape) != 2:
            return f"VeRA on a {len(shape)}-D tensor {list(shape)} is not merged yet"
        turned = fan_in_fan_out if shape[0] == shape[1] else shape[1] == out
        inn = shape[0] if turned else shape[1]
        if (shape[1] if turned else shape[0]) != out or inn > widest:
            return f"VeRA gives {out} output rows from at most {widest} inputs but the base tensor is {list(shape)}"
        lb, ld = self.lambda_b.reshape(-1, 1), self.lambda_d.reshape(-1, 1)
        a = DerivedTensor(self.a, (r, inn), lambda x: x[:, :inn].to(ld.dtype) * ld.to(x.device))
        b = DerivedTensor(self.b, (out, r), lambda x: x[:out].to(lb.dtype) * lb.to(x.device))
        return LowRank(a, b, self.scale, transposed=turned, kind="vera")

    def describe(self) -> str:
        return f"vera(r={self.a.shape[0]})"


@dataclass(frozen=True)
class Tiled:
    """MiSS (formerly Bone): ``ΔW[o, j] = block[j mod r, o mod m]``, the block (r × m) transposed and tiled over W;
    m is W's output size (peft's default) or ``mini_r`` (its "mini" form, the block repeated down the rows)."""

    block: object
    scale: float = 1.0  # 1, or an adapter's weight
    size: tuple = ()  # the logical (out, in), known once fitted
    transposed: bool | None = None

    name = "miss"
    rank = 1

    def tensors(self):
        return (self.block,)

    def fit(self, shape, fan_in_fan_out: bool = False):
        r, m = self.block.shape[:2] if len(self.block.shape) == 2 else (0, 0)
        if len(shape) != 2 or len(self.block.shape) != 2 or fan_in_fan_out:
            return f"MiSS's block {list(self.block.shape)} on the tensor {list(shape)} is not merged yet (2-D Linear only)"
        if shape[0] % m:
            return f"MiSS's block is {r} × {m} but the base tensor's {shape[0]} rows are not a multiple of {m}"
        return replace(self, size=tuple(shape), transposed=False)

    def describe(self) -> str:
        return f"miss(r={self.block.shape[0]})"


@dataclass(frozen=True)
class Spectrum:
    """FourierFT: ``ΔW = scale · Re(IFFT2(S))``, S (out × in) zero but for ``spectrum``'s n values at positions peft
    does not save: the first n of ``torch.randperm(out·in)`` drawn from a generator seeded with ``seed``, each
    position k at row k // in, column k % in. So ``ΔW[i, j] = scale/(out·in) · Σₖ cₖ cos(2π(uₖi/out + vₖj/in))``."""

    spectrum: object
    scale: float
    seed: int
    size: tuple = ()  # the logical (out, in), known once fitted
    transposed: bool | None = None

    name = "fourierft"

    @property
    def rank(self) -> int:
        return 2 * math.prod(self.spectrum.shape) + 40  # the terms of one element's sum, and its trigonometry

    def tensors(self):
        return (self.spectrum,)

    def positions(self):
        """(rows, columns) of the spectrum's values, drawn exactly as peft draws them."""
        out, inn = self.size
        drawn = _drawn(self.seed, out * inn, math.prod(self.spectrum.shape))
        return drawn // inn, drawn % inn

    def fit(self, shape, fan_in_fan_out: bool = False):
        n = math.prod(self.spectrum.shape)
        if len(shape) != 2 or len(self.spectrum.shape) != 1:
            return f"FourierFT on the tensor {list(shape)} is not merged yet (a Linear layer's weight only)"
        size = (shape[1], shape[0]) if fan_in_fan_out else tuple(shape)
        if n > math.prod(size):
            return f"FourierFT has {n} spectrum values but the base tensor {list(shape)} has fewer positions"
        return replace(self, size=size, transposed=bool(fan_in_fan_out))

    def describe(self) -> str:
        return f"fourierft(n={math.prod(self.spectrum.shape)}, s={self.scale:g}{', T' if self.transposed else ''})"


@lru_cache(maxsize=16)
def _drawn(seed: int, size: int, n: int):
    """The first n of ``torch.randperm(size)`` from a generator seeded with ``seed``: the same for every layer of one
    shape, and for the merge's blocks and the check's, so drawn once."""
    import torch

    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n].clone()


ADDITIVE = (Hadamard, Kronecker, Tiled, Spectrum)
