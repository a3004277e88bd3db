"""The inputs of a run: BASE and the adapters resolved (local folders or Hub repos), their order checked, the
adapters translated onto BASE's files and summed, and the plan made from headers, nothing written."""

from __future__ import annotations

import logging
from pathlib import Path

from .adapter import combine
from .dtypes import DTYPES, FLOAT_DTYPES
from .errors import WrongInputError
from .formats import AdapterOptions
from .names import family
from .options import MergeOptions
from .placement import Placement
from .plan import Plan, make_plan
from .quantize import Quantization
from .quantize import choose as choose_quantization
from .sources import BaseModel, Source, load_base, looks_like_model, resolve_source

log = logging.getLogger("lora_merge")

Adapters = "str | Path | list[str | Path | tuple[str | Path, float]]"


def adapter_list(adapter) -> list[tuple[str, float]]:
    """ADAPTER as given to the library: one spec, or several, each a spec or a (spec, weight) pair."""
    items = adapter if isinstance(adapter, (list, tuple)) and not _is_pair(adapter) else [adapter]
    return [(str(a[0]), float(a[1])) if _is_pair(a) else (str(a), 1.0) for a in items]


def _is_pair(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], (int, float)) and not isinstance(x[1], bool)


def prepare_plan(base: str, adapter: Adapters, options: MergeOptions, token: str | None) -> Plan:
    base_model, loaded, placement = load_inputs(base, adapter_list(adapter), token, options.adapter_options)
    for member in loaded.members:
        for mismatch in (_trained_on_other_base(member.config, base_model.source),
                         _trained_on_other_architecture(member.config, base_model.config)):
            if mismatch:
                log.warning(mismatch)
                loaded.notes.append(mismatch)
    plan = make_plan(base_model, loaded, dtype=options.dtype,
                     quantize=quantization(options.quantize, base_model, placement))
    if options.max_shard_bytes is not None:
        from .sharding import resharded

        plan = resharded(plan, options.max_shard_bytes)
    _log_plan(plan)
    return plan


def _log_plan(plan: Plan) -> None:
    """What the plan decided, for --verbose."""
    c = plan.counts()
    log.info("plan: %d tensors merged, %d copied as bytes, %d converted to another dtype, in %d shard(s)",
             c["merged"], c["copied"], c["converted"], len(plan.shards))
    for member in plan.adapter.members:
        log.info("adapter %s: %s format, %d tensors onto %d base tensors", member.path, member.format,
                 member.tensor_count, len(member.targets))
        families: dict[str, list[str]] = {}
        for name, disk in member.mapped.items():
            if disk != [name]:
                families.setdefault(family(name), []).extend(disk)
        for kind, disk in families.items():
            log.info("  %s: placed through %s onto %d on-disk tensors (%s)", kind, member.layout, len(disk),
                     ", ".join(sorted({family(d) for d in disk})))
    converted = {(e.base.dtype, e.dtype) for e in plan.entries if not e.is_copy and e.base is not None
                 and e.base.dtype != e.dtype}
    for source, target in sorted(converted):
        log.info("dtype: %s tensors written as %s", source, target)
    for change in plan.config_changes:
        log.info("config.json: %s", change)
    for note in plan.notes:
        log.info("note: %s", note)


def load_inputs(base: str, adapters: list[tuple[str, float]], token: str | None,
                 options: AdapterOptions | None, role: str = "BASE", each=None):
    """BASE's headers, the adapters translated onto its files (summed, with their weights) and the placement that
    did it (it knows the model in memory, if that was needed); nothing is planned yet."""
    base_source = resolve_source(base, role, token)
    sources = [(resolve_source(spec, "ADAPTER", token), weight) for spec, weight in adapters]
    check_order(base_source, [s for s, _ in sources], role)
    base_model = load_base(base_source, role)
    placement = Placement(base_model)
    loaded = []
    for source, weight in sources:
        adapter = placement.place(source.path, options)
        adapter.source, adapter.weight = source, weight
        if each is not None:
            each(adapter)
        loaded.append(adapter)
    return base_model, combine(loaded), placement


def quantization(method: str | None, base: BaseModel, placement: Placement) -> Quantization | None:
    """What ``--quantize method`` does to BASE's tensors (a quantized BASE is refused by the plan, unasked)."""
    if method is None:
        return None
    return Quantization(method) if base.quantization is not None else choose_quantization(method, base,
                                                                                          placement.layout)


def check_order(base: Source, adapters: list[Source], role: str = "BASE") -> None:
    """Refuse an adapter given as BASE, or a model given as ADAPTER, saying which is which."""
    from .formats import adapter_marker

    marker = adapter_marker(base.path)
    if marker is not None:
        same = any(a.path == base.path for a in adapters)
        also = " and as ADAPTER" if same else ""
        raise WrongInputError(f"{role} {base.spec!r}{also} is a LoRA adapter (it holds {marker}), not a model",
                              f"the order is {role} ADAPTER OUT: {role} is the model the adapter was trained on")
    for a in adapters:
        if a.path.is_dir() and not (a.path / "adapter_config.json").is_file() and looks_like_model(a.path):
            raise WrongInputError(f"ADAPTER {a.spec!r} is a model (config.json and weights, no adapter files), "
                                  "not an adapter", f"the order is {role} ADAPTER OUT")


def _trained_on_other_base(adapter_config: dict, base) -> str | None:
    """A warning when the adapter's base_model_name_or_path names another model than BASE."""
    from .names import repo_named

    named = adapter_config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named.strip():
        return None
    named_repo = repo_named(named)
    if base.repo_id and named_repo:
        same = named_repo[0].lower() == base.repo_id.lower()
    else:  # a local folder on either side: compare the model names
        ours = base.repo_id or str(base.path)
        same = Path(named.rstrip("/")).name.lower() == Path(ours.rstrip("/")).name.lower()
        same = same or Path(named).expanduser().resolve() == base.path
    if same:
        return None
    return f"the adapter was trained on {named!r} (base_model_name_or_path) but BASE is {base.repo_id or base.spec!r}"


def _trained_on_other_architecture(adapter_config: dict, base_config: dict) -> str | None:
    """A warning when the adapter's config names the model class it was trained on (peft's auto_mapping) and BASE's
    config.json names other classes: same-shaped tensors of another architecture would merge without a word."""
    mapping = adapter_config.get("auto_mapping")
    trained = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    classes = base_config.get("architectures")
    if not isinstance(trained, str) or not isinstance(classes, list) or not classes or trained in classes:
        return None
    return (f"the adapter was trained on a {trained} (auto_mapping.base_model_class) but BASE is a "
            f"{', '.join(map(str, classes))}: check that it is the model the adapter was made for")


def output_dtype(base_model, out_model) -> str | None:
    """The --dtype a merged folder was written with: one float dtype throughout that BASE does not have, or
    for a quantized BASE written dequantized, the dtype of its dequantized tensors."""
    quant = base_model.quantization
    if quant is not None and out_model.quantization is None:
        found = {out_model.tensors[n].dtype for n in quant.tensors if n in out_model.tensors}
        single = next(iter(found)) if len(found) == 1 else None
        return DTYPES[single].config_name if single in FLOAT_DTYPES else None
    out_floats = {i.dtype for i in out_model.tensors.values() if i.dtype in FLOAT_DTYPES}
    base_floats = {i.dtype for i in base_model.tensors.values() if i.dtype in FLOAT_DTYPES}
    if len(out_floats) == 1 and out_floats != base_floats:
        return DTYPES[next(iter(out_floats))].config_name
    return None
