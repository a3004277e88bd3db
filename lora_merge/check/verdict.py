"""What the check found for one tensor of the output: one typed value, built once by the check that made it.

A verdict is never edited afterwards: the writer's finding that the file does not hold the checked bytes is a
new verdict (``on_disk``). It says whether the tensor holds NaN or Inf (``finite``); whether that is acceptable
is judged once, by the report's finite check (``--allow-nonfinite``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

CHECK_BLOCK_BYTES = 6 * 1024 * 1024  # float64 bytes per row block when a written tensor is read back and checked

# the bound of an element written back in a quantized format: half a step of the format's grid at its exact value,
# and float64's own error in that value (relative); a scale within SCALE_TOLERANCE of the format's is that scale
# (float32 rounding, computed in either order)
HALF = 0.5
NOISE = 2.0**-45
SCALE_TOLERANCE = 2.0**-22
# a kept-format check's sums: the change's five (``Survival``), then ‖b − w‖², ‖(b − w) − d‖², ⟨b − w, d⟩ and the
# elements changed for b, what --dtype bfloat16 would store
SUMS = 9


@dataclass
class Check:
    """One row of the report: a check over the whole output, whether it passed, in one line, and every failure."""

    name: str
    ok: bool
    summary: str
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what passed but a user should see (always shown)

    def to_json(self) -> dict:
        return {"ok": self.ok, "summary": self.summary, "failures": self.failures} | (
            {"warnings": self.warnings} if self.warnings else {})


@dataclass(frozen=True)
class Survival:
    """How much of the adapter's change the stored tensor carries: the realized change (stored output minus
    BASE, both decoded exactly) against the exact change ΔW."""

    delta_energy: float = 0.0  # ‖ΔW‖², exact change
    realized_energy: float = 0.0  # ‖O − W‖²
    error_energy: float = 0.0  # ‖(O − W) − ΔW‖²
    cross: float = 0.0  # ⟨O − W, ΔW⟩: the share of ΔW's energy kept is cross / ‖ΔW‖²
    changed: int = 0  # elements whose stored value differs from BASE's
    elements: int = 0

    def __add__(self, other: Survival) -> Survival:
        return Survival(*(a + b for a, b in zip(self.numbers(), other.numbers(), strict=True)))

    def numbers(self) -> tuple:
        return (self.delta_energy, self.realized_energy, self.error_energy, self.cross, self.changed, self.elements)

    @property
    def relative_error(self) -> float | None:
        """‖(O − W) − ΔW‖ / ‖ΔW‖ (None: the exact change is zero)."""
        return (self.error_energy / self.delta_energy) ** 0.5 if self.delta_energy > 0 else None

    @property
    def kept(self) -> float | None:
        """The share of ΔW's energy the stored change carries: ⟨O − W, ΔW⟩ / ‖ΔW‖² (1: all of it)."""
        return self.cross / self.delta_energy if self.delta_energy > 0 else None

    @property
    def changed_share(self) -> float:
        return self.changed / self.elements if self.elements else 0.0

    def to_json(self) -> dict:
        kept, error = self.kept, self.relative_error
        number = lambda x: round(x, 6) if x is not None and math.isfinite(x) else None  # noqa: E731
        return {"kept": number(kept), "relative_error": number(error),
                "changed_share": round(self.changed_share, 6), "changed_elements": self.changed,
                "elements": self.elements, "delta_norm": number(self.delta_energy ** 0.5),
                "realized_norm": number(self.realized_energy ** 0.5)}


@dataclass(frozen=True)
class TensorVerdict:
    """One output tensor against what it must be: ``check`` says how it was judged.

    identical    a copy of BASE's tensor, byte for byte (``differs_at``: the first byte that is not)
    merged       a merged tensor, every element against its exact value and rounding bound
    converted    an untouched tensor written in another dtype, likewise
    requantized  a merged tensor written in BASE's quantized format: every element on the format's grid at its
                 block's scale, every changed block with the scale the format defines
    """

    check: str
    finite: bool = True
    failed_elements: int = 0
    max_error_ulp: float = 0.0  # in units in the last place of the dtype (requantized: steps of the format)
    max_error_of_bound: float = 0.0
    correctly_rounded: bool = True  # every element within half an ulp (a step) of its exact value
    first_failure: dict | None = None
    differs_at: int | None = None
    on_disk_differs_at: int | None = None  # the file does not hold the bytes that were checked, from this byte
    format: str | None = None  # requantized: the format's name
    scale_blocks: int = 0
    scale_blocks_exact: int = 0
    scale_failures: int = 0
    first_scale_failure: dict | None = None
    survival: Survival | None = None  # merged and requantized tensors: how much of the change was stored
    survival_bf16: Survival | None = None  # requantized: how much --dtype bfloat16 would have stored

    @property
    def ok(self) -> bool:
        """The bytes are what they must be: every element (NaN where the exact value is NaN included), and on disk.
        Whether NaN or Inf is acceptable at all is judged once, by the report's finite check."""
        return (self.failed_elements == 0 and self.scale_failures == 0 and self.differs_at is None
                and self.on_disk_differs_at is None)

    def on_disk(self, first_difference: int | None) -> TensorVerdict:
        """This verdict, with the file found not to hold the checked bytes from ``first_difference`` on."""
        return self if first_difference is None else replace(self, on_disk_differs_at=first_difference)

    def to_json(self) -> dict:
        if self.check == "identical":
            return {"check": "identical", "ok": self.ok, "differs_at": self.differs_at, "finite": self.finite}
        out = {"check": self.check}
        if self.format is not None:
            out["format"] = self.format
        out |= {"ok": self.ok, "max_error_ulp": round(self.max_error_ulp, 4)}
        if self.check == "requantized":
            out["bound_ulp"] = 0.5
        out |= {"max_error_of_bound": round(self.max_error_of_bound, 4), "correctly_rounded": self.correctly_rounded,
                "failed_elements": self.failed_elements}
        if self.check == "requantized":
            out |= {"scale_blocks": self.scale_blocks, "scale_blocks_exact": self.scale_blocks_exact,
                    "scale_failures": self.scale_failures}
        out["finite"] = self.finite
        for key in ("first_failure", "first_scale_failure", "on_disk_differs_at"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.survival is not None:
            out["delta_survival"] = self.survival.to_json()
        if self.survival_bf16 is not None:
            out["delta_survival_bfloat16"] = self.survival_bf16.to_json()
        return out


class QuantizedTally:
    """What a check of a tensor kept in its quantized format counts as it goes, and the verdict it makes of it: the
    worst error in steps of the format, elements and scale blocks that fail, the change's five sums (``sums``)."""

    def __init__(self, description: str):
        self.description = description
        self.sums = np.zeros(SUMS)
        self.elements = self.failed = self.blocks = self.exact_blocks = self.bad_scales = 0
        self.worst = self.worst_of_bound = 0.0
        self.first = self.first_bad_scale = None
        self.finite = True

    def result(self) -> TensorVerdict:
        dd, rr, ee, rd, changed, brr, bee, brd, bchanged = (float(x) for x in self.sums)
        return TensorVerdict(
            check="requantized", format=self.description, finite=self.finite, failed_elements=self.failed,
            max_error_ulp=self.worst, max_error_of_bound=self.worst_of_bound,  # in steps of the format
            correctly_rounded=self.worst <= HALF + 1e-6, first_failure=self.first, scale_blocks=self.blocks,
            scale_blocks_exact=self.exact_blocks, scale_failures=self.bad_scales,
            first_scale_failure=self.first_bad_scale,
            survival=Survival(dd, rr, ee, rd, int(changed), self.elements) if self.elements else None,
            survival_bf16=Survival(dd, brr, bee, brd, int(bchanged), self.elements) if self.elements else None)


def largest(ratio) -> float:
    """The largest of an array of ratios (0 for none); NaN (0 / 0 aside, which callers zero first) is infinite."""
    if not ratio.size:
        return 0.0
    top = float(np.nanmax(ratio)) if not np.all(np.isnan(ratio)) else 0.0
    return math.inf if math.isnan(top) else top
