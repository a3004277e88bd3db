"""The library's calls: ``prepare`` (the plan), ``merge``, ``unmerge`` and ``verify``. Each resolves its inputs
(``inputs.py``) and hands the plan to a run (``run.py``); the CLI is a thin layer over them."""

from __future__ import annotations

import logging
from pathlib import Path

from .check.report import Report, load_out, verify_output
from .devices import resolve
from .errors import QuantizationError
from .inputs import (
    Adapters,
    adapter_list,
    load_inputs,
    output_dtype,
    prepare_plan,
    quantization,
)
from .memory import resident_bytes
from .options import MergeOptions, UnmergeOptions, VerifyOptions, jobs_for
from .plan import Plan, make_plan
from .route import working_set
from .run import MergeResult, with_bar, write_run
from .sources import load_base, resolve_source

__all__ = ["MergeResult", "describe_plan", "merge", "prepare", "resolve_device", "unmerge", "verify"]

log = logging.getLogger("lora_merge")


def resolve_device(spec: str):
    """The Device that computes (``devices.resolve``): 'auto' is CUDA when present, else the CPU (and with CUDA,
    the CPU engine still takes every tensor it has kernels for: ``route.route``)."""
    return resolve(spec)


def describe_plan(plan: Plan, options: MergeOptions | None = None) -> dict:
    """The plan as data: what --dry-run prints."""
    options = options or MergeOptions()
    device = resolve_device(options.device)
    jobs = jobs_for(options.jobs)
    host, gpu = working_set(plan, device, options.block_bytes, jobs)
    baseline = resident_bytes()
    return {
        "base": str(plan.base.path),
        "adapter": ", ".join(f"{a.path}" + (f" (weight {a.weight:g})" if a.weight != 1.0 else "") for a in plan.adapter.members),
        "counts": plan.counts(),
        "bytes": plan.total_bytes,
        "jobs": jobs,
        "memory": {"baseline_bytes": baseline, "estimated_added_bytes": host,
                   "estimated_peak_bytes": baseline + host, "estimated_gpu_bytes": gpu or None},
        "shards": [s.name for s in plan.shards],
        "targets": [
            {"tensor": e.name, "shard": s.name, "operation": e.note, "shape": list(e.shape), "dtype": e.dtype}
            for s in plan.shards for e in s.entries if e.is_merge or not e.is_copy
        ],
        "config_changes": list(plan.config_changes),
        "notes": list(plan.notes),
        "placed_through_layout": {a.layout: a.placed_through_layout for a in plan.adapter.members
                                  if a.placed_through_layout},
    }


def prepare(base: str, adapter: Adapters, options: MergeOptions | None = None, *, token: str | None = None,
            **settings) -> Plan:
    """Resolve the inputs (local folders or Hub repos) and plan the merge from headers; ``adapter``
    is one adapter, or a list of adapters (or (adapter, weight) pairs) whose deltas are summed.
    ``settings`` change single fields of ``options`` (see MergeOptions).

    Raises before anything is written.
    """
    return prepare_plan(base, adapter, MergeOptions.make(options, **settings), token)


def merge(base: str, adapter: Adapters, out: str | Path, options: MergeOptions | None = None, *,
          token: str | None = None, progress=None, command: str | None = None, **settings) -> MergeResult:
    """Merge ADAPTER into BASE, write the result to OUT and check it.

    ``options`` says how (MergeOptions; ``settings`` change single fields of it: ``device="cpu"``),
    ``progress(total, label)`` makes a progress bar, ``command`` says how the merge was asked for (the
    model card and the report show it).

    Nothing exists at OUT unless the merge completes. OUT then holds merge_report.json and a model
    card (README.md). When a parity check fails, OUT stays (marked failed in its report) and ParityError
    is raised. NaN or Inf in the adapter or in a merged tensor is an error unless ``allow_nonfinite``.
    With ``resume``, the temporary output survives a failure or an interruption, and a later run with
    ``resume`` keeps the shards it finished (when their hashes and the plan still match).
    """
    options = MergeOptions.make(options, **settings)
    plan = prepare_plan(base, adapter, options, token)
    return write_run(plan, out, options, progress=progress, command=command or _python_call("merge", base, adapter, out))


def unmerge(merged: str, adapter: Adapters, out: str | Path, options: UnmergeOptions | None = None, *,
            original: str | None = None, token: str | None = None, progress=None, command: str | None = None,
            **settings) -> MergeResult:
    """Subtract ADAPTER's delta from the merged model MERGED and write the base back to OUT.

    The report (OUT/merge_report.json) checks OUT against MERGED minus the adapter like a merge's, and
    adds the round trip: elements certainly recovered and, when ``original`` (the base model the merge
    started from) is given, elements bit-identical to it and the worst error in ulp.
    """
    from .unmerge import add_round_trip, refuse_irreversible

    options = UnmergeOptions.make(options, **settings)
    specs = [(spec, -weight) for spec, weight in adapter_list(adapter)]
    merged_model, loaded, _ = load_inputs(merged, specs, token, options.adapter_options, role="MERGED",
                                           each=refuse_irreversible)
    if merged_model.quantization is not None:
        raise QuantizationError(
            f"MERGED is stored quantized ({merged_model.quantization.description}): its merged weights were rounded "
            "to that format, so subtracting the adapter cannot give back BASE's", [],
            "unmerge works on a merge written in a float dtype (without --quantize; from a quantized BASE, with "
            "--dtype); otherwise keep BASE, which the merged model cannot give back")
    plan = make_plan(merged_model, loaded, role="MERGED").with_notes("unmerged: the adapter's delta was subtracted")
    original_model = load_base(resolve_source(original, "BASE")) if original is not None else None

    def check(folder, plan, dev, provenance, bar, found):
        report = verify_output(folder, plan, dev, found=found, provenance=provenance, progress=bar,
                               shown_as=str(Path(out).expanduser().resolve()))
        return add_round_trip(report, folder, plan, dev, original_model)

    return write_run(plan, out, options.as_run(), progress=progress, check=check, model_card=False,
                     command=command or _python_call("unmerge", merged, adapter, out))


def _python_call(function: str, base, adapter, out) -> str:
    return f"lora_merge.{function}({str(base)!r}, {str(adapter)!r}, {str(out)!r})"


def verify(out: str | Path, base: str, adapter: Adapters, options: VerifyOptions | None = None, *,
           token: str | None = None, progress=None, **settings) -> Report:
    """Check a merged folder (written by any tool, any shard layout) against BASE and ADAPTER(s)."""
    options = VerifyOptions.make(options, **settings)
    out_src = resolve_source(str(out), "OUT")
    out_model = load_out(out_src.path)
    base_model, loaded, placement = load_inputs(base, adapter_list(adapter), token, options.adapter_options)
    quantize = "fp8" if base_model.quantization is None and out_model.quantization is not None \
        and out_model.quantization.method == "fp8" else None  # written with --quantize fp8
    plan = make_plan(base_model, loaded, dtype=None if quantize else output_dtype(base_model, out_model),
                     quantize=quantization(quantize, base_model, placement))
    dev = resolve_device(options.device)
    log.info("checking on %s", dev)
    return with_bar(progress, plan.total_bytes, "verifying",
                     lambda bar: verify_output(out_src.path, plan, dev, out_model=out_model, progress=bar,
                                               accept=options.check, jobs=jobs_for(options.jobs)))
