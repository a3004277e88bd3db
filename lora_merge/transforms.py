"""The adapter kinds that transform W itself, ``W' = f(W)``, as canonical operations on one base tensor: IA3
multiplies W by a vector along its rows or its columns (``Scaling``); OFT and BOFT mix each row's columns block by
block (``Rotation``), HRA by reflections (``Reflection``); RoAd turns pairs of rows into each other (``Pairs``).

Like the additive kinds of ``kinds.py``, each states how it fits a stored tensor (``fit``) and names itself
(``describe``). The arithmetic is elsewhere: the merge's in ``kindmath.py`` and the modules it calls
(``orthomath.py``, ``roadmath.py``), the check's own in ``check/kinds.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Scaling:
    """IA3: W' = W ⊙ l, ``l`` one factor per logical row (``columns`` False) or per logical column (True); on a
    bias (1-D), one per element. ``inverse``: W' = W ⊘ l, how unmerge takes IA3 back out."""

    l: object  # noqa: E741 (peft's name)
    columns: bool
    transposed: bool | None = None
    inverse: bool = False

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
        undone = ", divided" if self.inverse else ""
        return f"ia3({'columns' if self.columns else 'rows'}{', T' if self.transposed else ''}{undone})"


@dataclass(frozen=True)
class Rotation:
    """OFT and BOFT: ``W' = W · Rᵀ`` (then each row times ``rows``, BOFT's ``boft_s``), R block-diagonal, each block
    ``b × b`` the Cayley map of a skew-symmetric Q: ``(I − Q)(I + Q)⁻¹`` exactly (``terms`` 0), or the truncated
    Neumann series OFT uses by default, I + 2Q + 2Q² + … (``terms`` > 0, peft's ``num_cayley_neumann_terms``).
    OFT's ``q`` holds each Q by its upper triangle (peft's ``oft_R.weight``, blocks × b(b−1)/2); BOFT's (``full``)
    whole matrices D, Q = ½(D − Dᵀ) (``boft_R``, 1 × blocks × b × b). With ``shared``, one block serves every
    position (OFT's ``block_share``). Each stored row of W mixes its own columns, block by block."""

    q: object
    size: int  # b
    terms: int
    shared: bool = False
    full: bool = False
    rows: object = None  # BOFT's scale per output row (out × 1), or None
    transposed: bool | None = None

    @property
    def name(self) -> str:
        return "boft" if self.full else "oft"

    @property
    def blocks(self) -> int:
        return 1 if self.shared else self.q.shape[-3] if self.full else self.q.shape[0]

    def tensors(self):
        return (self.q,) if self.rows is None else (self.q, self.rows)

    def powers(self) -> list[tuple[int, float]]:
        """(power of Q, coefficient) of the Neumann series as peft sums it: I + 2Q + 2Q² + 2Q³ … + Q^last."""
        n = self.terms
        if n <= 1:
            return [(0, 1.0)]
        if n == 2:
            return [(0, 1.0), (1, 2.0)]
        return [(0, 1.0), (1, 2.0), (2, 2.0), *((k, 2.0) for k in range(3, n - 1)), (max(3, n - 1), 1.0)]

    def fit(self, shape, fan_in_fan_out: bool = False):
        what = self.name.upper()
        if len(shape) != 2 or fan_in_fan_out:
            return f"{what} on the tensor {list(shape)} is not merged yet (a Linear layer's [out, in] weight only)"
        if shape[1] % self.size or not self.shared and self.blocks * self.size != shape[1]:
            return f"{what}'s {self.blocks} blocks of {self.size} do not cover the base tensor's {shape[1]} input columns"
        if self.rows is not None and math.prod(self.rows.shape) != shape[0]:
            return f"boft_s has {math.prod(self.rows.shape)} values but the base tensor has {shape[0]} rows"
        return replace(self, transposed=False)

    def describe(self) -> str:
        how = f"neumann {self.terms}" if self.terms else "cayley"
        return f"{self.name}(b={self.size}, {how}{', shared' if self.shared else ''})"


@dataclass(frozen=True)
class Reflection:
    """HRA: ``W' = W · H``, H = H₀H₁⋯H_{r−1}, each ``Hᵢ = I − 2uᵢuᵢᵀ / (uᵢᵀuᵢ)`` a Householder reflection by a column
    of ``u`` (peft's ``hra_u``, in × r): each stored row of W is reflected r times in turn."""

    u: object
    transposed: bool | None = None

    name = "hra"

    def tensors(self):
        return (self.u,)

    def fit(self, shape, fan_in_fan_out: bool = False):
        if len(shape) != 2 or fan_in_fan_out or len(self.u.shape) != 2 or self.u.shape[0] != shape[1]:
            return (f"HRA's hra_u {list(self.u.shape)} on the tensor {list(shape)} is not merged yet (a Linear "
                    "layer's [out, in] weight with hra_u [in, r] only)")
        return replace(self, transposed=False)

    def describe(self) -> str:
        return f"hra(r={self.u.shape[1]})"


MIXING = (Rotation, Reflection)  # the multiplicative kinds that mix each stored row's columns


@dataclass(frozen=True)
class Pairs:
    """RoAd: each group of ``group`` output rows turns its two halves into each other, as a rotation (scaled) of
    each pair of rows i and i + group/2: ``W'[i] = fᵢ·W[i] − sᵢ·W[i + h]`` and ``W'[i + h] = f_{i+h}·W[i + h] +
    s_{i+h}·W[i]``, with ``f = α₁ cos θ₁`` and ``s = α₂ sin θ₂`` per row, laid out from ``theta`` and ``alpha`` by
    peft's ``variant`` (road_1: one pair of values per row pair, road_2: per row, road_4: each column its own).
    The layer's bias turns alike. Row blocks are whole groups (``row_unit``)."""

    theta: object
    alpha: object
    variant: str
    group: int
    transposed: bool | None = None

    name = "road"

    @property
    def row_unit(self) -> int:
        return self.group

    def tensors(self):
        return self.theta, self.alpha

    def per_row(self, theta, alpha):
        """(α₁, θ₁, α₂, θ₂) per output row from the loaded values, as peft's ``_prepare_cols`` lays them out."""
        h = self.group // 2
        if self.variant == "road_1":
            theta = theta.reshape(-1, h).repeat_interleave(2, dim=0).flatten()
            alpha = alpha.reshape(-1, h).repeat_interleave(2, dim=0).flatten()
        if self.variant == "road_4":
            theta, alpha = theta.reshape(-1, 2, self.group), alpha.reshape(-1, 2, self.group)
            return alpha[:, 0].flatten(), theta[:, 0].flatten(), alpha[:, 1].flatten(), theta[:, 1].flatten()
        return alpha, theta, alpha, theta

    def fit(self, shape, fan_in_fan_out: bool = False):
        per = {"road_1": 0.5, "road_2": 1, "road_4": 2}.get(self.variant)
        rows = shape[0] if shape else 0
        if per is None:
            return f"RoAd's variant {self.variant!r} is not one peft defines (road_1, road_2, road_4)"
        if len(shape) not in (1, 2) or fan_in_fan_out or rows % self.group or self.group % 2:
            return (f"RoAd's groups of {self.group} rows on the tensor {list(shape)} are not merged (a Linear layer's "
                    "[out, in] weight or its bias, out a multiple of an even group size)")
        if math.prod(self.theta.shape) != rows * per or self.theta.shape != self.alpha.shape:
            return (f"RoAd's road_theta {list(self.theta.shape)} and road_alpha {list(self.alpha.shape)} do not fit "
                    f"{rows} rows ({self.variant})")
        return replace(self, transposed=False)

    def describe(self) -> str:
        return f"road({self.variant}, group={self.group})"

