"""The output's structure and the adapter's coverage: every tensor of BASE (plus an untied ``lm_head``) in OUT with
the name, shape and dtype BASE and the adapter call for, each expected difference with its cause; and every
tensor of every adapter used by some target (or ignored for a stated reason)."""

from __future__ import annotations

import math

from ..numbers.quantized import QuantizedTensor
from ..plan import Plan
from .verdict import Check


def _count(infos) -> dict:
    infos = list(infos)
    return {
        "tensors": len(infos),
        "parameters": sum(math.prod(i.shape) for i in infos),
        "bytes": sum(i.nbytes for i in infos),
    }


def check_structure(plan: Plan, out_model) -> tuple[Check, dict]:
    expected = {name: (dtype, shape) for e in plan.entries for name, dtype, shape in e.stored}
    actual = out_model.stored
    base = plan.base.tensors
    differences = []
    for e in plan.entries:
        if e.name not in base and e.name not in plan.base.stored:
            differences.append({"tensor": e.name, "what": f"not stored in {plan.role}", "cause": f"untied from {e.base.name}"})
            continue
        if e.shape != e.base.shape:
            differences.append(
                {
                    "tensor": e.name,
                    "what": f"shape {list(e.base.shape)} -> {list(e.shape)}",
                    "cause": "vocabulary resized by the adapter",
                }
            )
        source = getattr(e.base, "source", None)
        if source is not None:  # --quantize
            differences.append({"tensor": e.name, "what": f"dtype {source.dtype} -> {e.dtype} with a weight_scale_inv",
                                "cause": e.base.description})
        elif e.dtype != e.base.dtype:
            dequantized = isinstance(e.base, QuantizedTensor)
            differences.append(
                {"tensor": e.name, "what": f"dtype {e.base.dtype} -> {e.dtype}",
                 "cause": f"--dtype: dequantized from {e.base.description}" if dequantized else "--dtype conversion"}
            )
    failures = []
    for name, (dtype, shape) in expected.items():
        got = actual.get(name)
        if got is None:
            failures.append(f"{name}: missing from OUT")
            continue
        if got.shape != shape:
            failures.append(f"{name}: shape {list(got.shape)}, expected {list(shape)}")
        if got.dtype != dtype:
            failures.append(f"{name}: dtype {got.dtype}, expected {dtype}")
    failures += [
        f"{name}: in OUT but neither in {plan.role} nor made by the adapter" for name in sorted(set(actual) - set(expected))
    ]
    out_counts, base_counts = _count(actual.values()), _count(plan.base.stored.values())
    summary = (
        f"{out_counts['tensors']} tensors, {out_counts['parameters']:,} parameters, {out_counts['bytes'] / 1e6:,.1f} MB; "
        + (
            f"names, shapes and dtypes as {plan.role}"
            if not failures
            else f"{len(failures)} differences from what {plan.role} and ADAPTER make"
        )
        + (f" ({len(differences)} expected difference{'s' if len(differences) != 1 else ''})" if differences else "")
    )
    data = {"base": base_counts, "out": out_counts, "expected_differences": differences, "failures": failures}
    return Check("structure", not failures, summary, failures), data


def check_coverage(plan: Plan) -> tuple[Check, dict]:
    """Every tensor of every adapter lands somewhere (or is ignored for a stated reason)."""
    entries = {e.name for e in plan.entries if e.is_merge}
    failures: list[str] = []
    members = []
    for i, adapter in enumerate(plan.adapter.members):
        data, left_over = _member_coverage(adapter)
        label = f"adapter {i + 1}: " if len(plan.adapter.members) > 1 else ""
        failures += [f"{label}{n}: adapter tensor used by no target" for n in left_over]
        members.append(data)
    ops = list(plan.adapter.targets.values())
    failures += [f"{op.name}: adapter target not written" for op in ops if op.name not in entries]
    if len(members) == 1:
        data = members[0]
        summary = _coverage_line(data)
    else:
        data = {"adapters": members, "targets": len(ops)}
        summary = f"{len(members)} adapters onto {len(ops)} base tensors: " + "; ".join(
            f"{i + 1}: {_coverage_line(m)}" for i, m in enumerate(members))
    return Check("coverage", not failures, summary, failures), data


def _member_coverage(adapter) -> tuple[dict, list[str]]:
    ops = list(adapter.targets.values())
    used = adapter.used_tensor_names()
    left_over = [n for n in adapter.tensor_names if n not in used and n not in adapter.ignored]
    data = {
        "adapter": str(adapter.path),
        "format": adapter.format,
        "kind": adapter.kind,
        "weight": adapter.weight,
        "adapter_tensors": adapter.tensor_count,
        "adapter_modules": len({op.module for op in ops}),
        "targets": len(ops),
        "merged": sum(1 for op in ops if op.deltas or op.dora_magnitude is not None or op.multiply is not None),
        "replaced": sum(1 for op in ops if op.replace is not None),
        "rows_replaced": sum(1 for op in ops if op.row_indices is not None),
        "left_over": left_over,
        "ignored": adapter.ignored,
        "direct": (len(adapter.mapped) if adapter.mapped else len(ops)) - adapter.placed_through_layout,
        "through_mapping": adapter.placed_through_layout,
        "mapping": adapter.layout,
    }
    return data, left_over


def _coverage_line(data: dict) -> str:
    weight = f" (weight {data['weight']:g})" if data["weight"] != 1.0 else ""
    return (
        f"{data['adapter_tensors']} adapter tensors in {data['adapter_modules']} modules{weight}: "
        f"{data['merged']} tensors merged, {data['replaced']} replaced, {data['rows_replaced']} with rows replaced, "
        f"{len(data['left_over'])} left over"
        + (f", {len(data['ignored'])} ignored by design" if data["ignored"] else "")
        + (f"; {data['through_mapping']} named for the model in memory, placed through {data['mapping']}"
           if data["through_mapping"] else "")
    )
