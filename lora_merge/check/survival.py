"""How much of the adapter's change the stored model carries: the "merged model behaves exactly like the base" failure,
measured.

Each merged tensor's check adds up, as it judges the elements, the exact change ΔW = v − W and the stored one O − W
(``verdict.Survival``); this sums them over the output. The share of ΔW's energy kept is ⟨O − W, ΔW⟩ / ‖ΔW‖² (1: all
of it), the relative error ‖(O − W) − ΔW‖ / ‖ΔW‖. A tensor the adapter changes whose stored bytes did not change at all
is always named. ``min_delta_kept`` turns the figures into a pass or a fail, for CI.
"""

from __future__ import annotations

from ..plan import Plan
from .verdict import Check, Survival, TensorVerdict

LOW = 0.5  # a tensor that keeps less than this share of its change is named
NAMED = 3  # tensors named on the summary line (the JSON and the warnings have them all)


def check_survival(plan: Plan, tensors: dict[str, TensorVerdict], min_kept: float | None) -> tuple[Check, dict]:
    """The ``delta`` check and its data: the overall share kept, the tensors that kept little, those that kept none."""
    measured = {e.name: tensors[e.name].survival for e in plan.entries
                if e.is_merge and e.name in tensors and tensors[e.name].survival is not None}
    total = sum(measured.values(), Survival())
    unchanged = sorted(n for n, s in measured.items() if s.delta_energy > 0 and s.changed == 0)
    low = sorted((n for n, s in measured.items() if s.kept is not None and s.kept < LOW and n not in unchanged),
                 key=lambda n: measured[n].kept)
    data = {"min_delta_kept": min_kept, **total.to_json(), "tensors": len(measured),
            "unchanged": unchanged, "kept_below_half": {n: round(measured[n].kept, 6) for n in low}}
    alternatives = [tensors[n].survival_bf16 for n in measured if tensors[n].survival_bf16 is not None]
    bf16 = sum(alternatives, Survival()) if alternatives else None
    if bf16 is not None:  # written in a quantized format: what --dtype bfloat16 would have kept of the same change
        data["if_bfloat16"] = bf16.to_json()
    warnings = [f"{n}: the adapter changes it, but not one of its stored values changed: the change was rounded "
                "away (a wider output dtype keeps it: --dtype float32)" for n in unchanged]
    failures = []
    if min_kept is not None:
        if total.kept is None:
            failures.append("the adapter's change is zero everywhere: there is nothing of it to keep")
        elif total.kept < min_kept:
            failures.append(f"the stored model keeps {total.kept:.1%} of the adapter's change, below --min-delta-kept "
                            f"{min_kept:g}")
        failures += [f"{n}: none of the adapter's change was stored (--min-delta-kept {min_kept:g})" for n in unchanged]
    summary = _summary(total, measured, unchanged, low, "the change of taking the adapter out" if plan.role == "MERGED"
                       else "the adapter's change")
    if bf16 is not None and bf16.kept is not None and total.kept is not None:
        summary += (f" (written with --dtype bfloat16 it would keep {bf16.kept:.1%}, relative error "
                    f"{bf16.relative_error:.2g})")
    return Check("delta", not failures, summary, failures, [] if failures else warnings), data


def share(x: float) -> str:
    """A share as a percentage, a rounded-away negative one as 0."""
    return f"{max(x, 0.0) if x > -0.0005 else x:.1%}"


def _summary(total: Survival, measured: dict[str, Survival], unchanged: list[str], low: list[str], change: str) -> str:
    if not measured:
        return "no merged tensor to measure"
    if total.kept is None:
        return f"{change} is zero everywhere: the output holds the input's values"
    line = (f"OUT keeps {share(total.kept)} of {change} (by energy; relative error {total.relative_error:.2g}), "
            f"{total.changed_share:.1%} of the merged elements changed")
    if low:
        line += (f"; {len(low)} tensor{'s' if len(low) > 1 else ''} keep less than {LOW:.0%}, e.g. "
                 + ", ".join(f"{n} ({share(measured[n].kept)})" for n in low[:NAMED]))
    if unchanged:
        line += (f"; {len(unchanged)} tensor{'s' if len(unchanged) > 1 else ''} the adapter changes stored "
                 "unchanged, e.g. " + ", ".join(unchanged[:NAMED]))
    return line


CLOSE = 4  # ulp (or steps of a quantized format): farther than this, it is not a rounding that went astray


def diagnose(found: Survival, worst: float, unit: str = "ulp", role: str = "BASE") -> tuple[str, str]:
    """What a set of tensors that fail the merged check holds instead of the exact merge, from their largest error
    (``worst`` ulp, or steps of their format) and how their stored change compares with the adapter's; and what to
    do: (what, hint)."""
    kept = found.kept
    if found.changed == 0:
        return (f"they hold {role}'s values: the adapter was not merged into them",
                "check that OUT is the merged folder, or merge again")
    if worst <= CLOSE:
        return (f"they carry this adapter's change, rounded less exactly than the exact merge rounded once (up to "
                f"{worst:.2f} {unit} from it): a merge in lower precision, or rounded twice",
                "merge again with lora-merge for correctly rounded weights")
    if kept is None or abs(kept) < 0.1:
        return ("their change is not this adapter's: another adapter was merged (or into another base)",
                "check that --adapter is the adapter that was merged and --base the model it was merged into")
    if abs(kept - 1) <= 0.05:
        return ("they carry this adapter's change, but on other weights: it was merged into another base",
                "check that --base is the model the adapter was merged into")
    return (f"they carry {kept:.3g} times this adapter's change: it was merged with another scale",
            "check lora_alpha and r in the adapter's config, or give the weight it was merged with "
            "(--adapter ADAPTER:WEIGHT)")
