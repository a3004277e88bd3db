"""From headers alone: which output tensor comes from where, and every reason it cannot be done.

Nothing here reads tensor data. Every adapter target must land on exactly one base tensor with a
compatible shape; all offenders are collected and reported at once, before anything is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property

from .adapter import Adapter, AddScaled, LowRank, TargetOps
from .dtypes import DTYPES, FLOAT_DTYPES, OUTPUT_DTYPES
from .errors import PlanError, QuantizationError
from .numbers import QuantizedTensor, sixteen_bit_original
from .numbers.fp8.codec import Fp8Quantized
from .quantize import Quantization
from .safetensors_file import TensorInfo
from .sources import INDEX_NAME, BaseModel

OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight", "output.weight")
INPUT_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "tok_embeddings.weight",
    "shared.weight",
)
# Models whose linear layers are transformers' Conv1D (weights stored in × out); peft forces
# fan_in_fan_out for them.
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}


@dataclass(frozen=True)
class Entry:
    """One tensor of an output shard."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    base: TensorInfo | QuantizedTensor | None  # the base tensor it starts from (None: entirely from the adapter)
    ops: TargetOps | None = None  # None: the base tensor as it is (copied, or converted)
    note: str = ""

    @property
    def written_quantized(self) -> bool:
        """Written in BASE's quantized format (its codes and scales), not as one tensor of a float dtype."""
        return isinstance(self.base, QuantizedTensor) and self.dtype == self.base.dtype

    @property
    def stored(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """The tensors written for it, in order: (name, dtype, shape)."""
        if self.written_quantized:
            return [(p.name, p.dtype, p.shape) for p in self.base.parts]
        return [(self.name, self.dtype, self.shape)]

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * DTYPES[dtype].size for _, dtype, shape in self.stored)

    @property
    def is_copy(self) -> bool:
        return (self.ops is None and self.base is not None and self.base.dtype == self.dtype
                and getattr(self.base, "stored_as_is", True))

    @property
    def is_merge(self) -> bool:
        return self.ops is not None

    @property
    def width(self) -> int:
        """Elements per index of the first dimension (1 for a scalar)."""
        return max(math.prod(self.shape[1:]), 1)

    def rows_per_block(self, block_bytes: int) -> int:
        """How many rows make a float64 block of at most ``block_bytes`` (at least one; whole groups of rows where
        the adapter mixes rows). A tensor written in a quantized format is taken in whole rows of its scale blocks
        where that costs at most four times as much (``needs_prepass`` says when it does not)."""
        step = max(1, block_bytes // (8 * self.width))
        unit = getattr(self.ops.multiply, "row_unit", 1) if self.ops is not None else 1
        if unit > 1:  # an adapter that mixes rows (RoAd's groups): whole groups in each block
            step = max(unit, step - step % unit)
        if self.written_quantized:
            unit = self.base.row_unit
            if unit <= step:
                step -= step % unit
            elif unit * self.width * 8 <= 4 * block_bytes:
                step = unit
        return step

    def needs_prepass(self, step: int) -> bool:
        """Written in a quantized format whose scale blocks span more rows than a block of ``step``: each block's
        scale must be found over all of its rows first."""
        if not self.written_quantized or step >= self.shape[0]:
            return False
        return step % self.base.row_unit != 0 or bool(self.base.global_scale)


@dataclass(frozen=True)
class OutputShard:
    name: str
    entries: tuple[Entry, ...]
    metadata: dict[str, str]
    # the stored tensors' names in file order, where OUT keeps BASE's (None: the entries' order): a quantized
    # tensor's codes and scales may lie apart, and a merge that changes nothing must give BASE's bytes
    order: tuple[str, ...] | None = None

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def stored(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """Every tensor the file holds, in file order: (name, dtype, shape)."""
        parts = {s[0]: s for e in self.entries for s in e.stored}
        return list(parts.values()) if self.order is None else [parts[n] for n in self.order]


@dataclass(frozen=True)
class Plan:
    """The whole output, decided from headers alone: a value, never edited once made (``with_notes`` and
    ``sharding.resharded`` make new ones)."""

    base: BaseModel
    adapter: Adapter
    shards: tuple[OutputShard, ...]
    config: dict
    config_changes: tuple[str, ...]
    notes: tuple[str, ...] = ()
    sharded: bool = True
    index_name: str = INDEX_NAME  # the index OUT gets when sharded
    role: str = "BASE"  # what the plan starts from, as reports name it: MERGED when unmerging

    def with_notes(self, *notes: str) -> Plan:
        """The same plan with more notes for the report (what the run found before writing)."""
        return replace(self, notes=self.notes + tuple(n for n in notes if n))

    @property
    def formula(self) -> str:
        """What each changed element is, in words for the report."""
        kinds = {m.kind for m in self.adapter.members}
        if any(getattr(op.multiply, "inverse", False) for op in self.adapter.targets.values()):  # IA3, alone
            return "W ⊘ l"
        if "IA3" in kinds:
            return "W ⊙ l" if kinds == {"IA3"} else "W ⊙ l or W + ΔW"
        delta = "s·B·A" if kinds <= {"LoRA", "AdaLoRA"} else "ΔW"
        return f"W − {delta}" if self.role == "MERGED" else f"W + {delta}"

    @cached_property
    def entries(self) -> tuple[Entry, ...]:
        return tuple(e for s in self.shards for e in s.entries)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def counts(self) -> dict[str, int]:
        es = self.entries
        return {
            "tensors": len(es),
            "merged": sum(1 for e in es if e.is_merge),
            "copied": sum(1 for e in es if e.is_copy),
            "converted": sum(1 for e in es if not e.is_merge and not e.is_copy),
            "adapter_tensors": self.adapter.tensor_count,
            "adapter_targets": len(self.adapter.targets),
        }


def _find_input_embedding(tensors: dict[str, TensorInfo]) -> str | None:
    for name, info in tensors.items():
        if name.endswith(INPUT_EMBEDDING_SUFFIXES) and len(info.shape) == 2:
            return name
    return None


def _fit_target(op: TargetOps, w_shape: tuple[int, ...], info, conv1d: bool) -> tuple[TargetOps, list[str]]:
    """The target with every delta's orientation decided for the stored tensor (a copy: the adapter's
    own objects are left as they are), and every reason it does not fit."""
    problems = []
    where = op.name
    numbers = info.dtype in FLOAT_DTYPES or isinstance(info, QuantizedTensor)
    if not numbers and (op.deltas or op.dora_magnitude is not None or op.multiply is not None):
        return op, [f"{where}: base dtype {info.dtype} is not floating point; LoRA cannot be added to it"]
    multiply = op.multiply
    if multiply is not None:
        multiply = multiply.fit(w_shape, op.fan_in_fan_out or conv1d)
        if isinstance(multiply, str):
            problems.append(f"{where}: {multiply}")
            multiply = None
        elif op.replace is not None or op.dora_magnitude is not None or op.row_indices is not None:
            problems.append(f"{where}: {multiply.name} multiplies a tensor that is also changed otherwise, which is "
                            "not merged yet")
    deltas = []
    for d in op.deltas:
        if isinstance(d, AddScaled):
            if tuple(d.t.shape) != tuple(w_shape):
                problems.append(f"{where}: lora_B.bias has shape {list(d.t.shape)}, expected {list(w_shape)}")
            deltas.append(d)
            continue
        fitted = d.fit(w_shape, op.fan_in_fan_out or conv1d)
        if isinstance(fitted, str):
            problems.append(f"{where}: {fitted}")
        else:
            deltas.append(fitted)
    low_rank = [d for d in deltas if isinstance(d, LowRank)]
    # the DoRA norm runs over each logical output row: across stored columns when transposed
    dora_transposed = bool(low_rank[0].transposed) if low_rank else False
    if op.dora_magnitude is not None and low_rank:
        out_dim = low_rank[-1].b.shape[0]
        m_shape = tuple(op.dora_magnitude.shape)  # (out,), or (1, out, 1, …) for convolutions
        if math.prod(m_shape) != out_dim or max(m_shape, default=0) != out_dim:
            problems.append(
                f"{where}: DoRA magnitude has shape {list(op.dora_magnitude.shape)}, expected [{out_dim}]"
            )
    if op.row_indices is not None:
        rows = op.rows
        bad = [i for i in op.row_indices if not 0 <= i < (w_shape[0] if w_shape else 0)]
        if bad:
            problems.append(f"{where}: trainable token indices {bad[:5]} are outside 0..{w_shape[0] - 1}")
        if tuple(rows.shape[1:]) != tuple(w_shape[1:]):
            problems.append(f"{where}: trainable token rows have shape {list(rows.shape)}, expected [n, {list(w_shape[1:])}]")
    return replace(op, deltas=deltas, multiply=multiply, dora_transposed=dora_transposed), problems


@dataclass
class _Targets:
    """What matching the adapter against BASE found: each target with its deltas fitted to the stored tensor and the
    tensor it starts from, every problem and note, and what the tied embeddings need."""

    resolved: dict[str, tuple[TargetOps, TensorInfo]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    added: dict[str, Entry] = field(default_factory=dict)  # tensors the base does not store (an untied lm_head)
    untie: bool = False
    tie_source: str | None = None


def make_plan(base: BaseModel, adapter: Adapter, dtype: str | None = None,
              quantize: Quantization | None = None, role: str = "BASE") -> Plan:
    """Match the adapter against the base and lay out the output, or raise PlanError with every problem;
    ``quantize``: which of BASE's float weights OUT stores quantized, and how (``quantize.py``); ``role``: what
    the plan starts from, as reports name it (MERGED when unmerging)."""
    out_dtype = OUTPUT_DTYPES[dtype] if dtype else None
    keep = refuse_combinations(base, dtype, quantize)
    found = resolve_targets(base, adapter, keep)
    untie_embeddings(base, found, keep, out_dtype)
    raise_problems(found.problems)
    shards = lay_out(base, found, keep, out_dtype, quantize)
    config, changes = rewrite_config(base, shards, out_dtype, found, quantize)
    notes = (list(adapter.notes) + _quantization_notes(base, adapter, out_dtype) + (list(quantize.notes) if quantize
             else []) + found.notes)
    plan = Plan(base, adapter, tuple(shards), config, tuple(changes), tuple(notes),
                sharded=len(base.shards) > 1 or base.index_metadata != {}, index_name=base.index_name, role=role)
    _check_vocab(plan, found.tie_source)
    return plan


def refuse_combinations(base: BaseModel, dtype: str | None, quantize: Quantization | None) -> bool:
    """Refuse what cannot be asked together; whether merged tensors are written back in BASE's quantized format."""
    quant = base.quantization
    if quantize and (quant is not None or dtype):
        raise QuantizationError(
            f"--quantize {quantize.method} writes a float BASE quantized; BASE is {quant.description}" if quant else
            f"--quantize {quantize.method} and --dtype {dtype} both say what OUT's weights are", [],
            "merge a quantized BASE keeping its format (or with --dtype); give one of --quantize and --dtype")
    keep = quant is not None and not dtype
    if keep and not quant.requantizable:
        raise QuantizationError(
            f"BASE is {quant.description}: lora-merge merges it into a dequantized checkpoint only (requantizing "
            "would change the weights more than the adapter does), and --dtype says into which dtype", [],
            "pass --dtype bfloat16 (or float16, float32)")
    return keep


def resolve_targets(base: BaseModel, adapter: Adapter, keep: bool) -> _Targets:
    """Each adapter target on the tensor of BASE it changes (the input embedding for a tied output layer), its
    deltas fitted to that tensor, and every reason one does not fit."""
    tensors = base.tensors
    conv1d = str(base.config.get("model_type", "")) in CONV1D_MODEL_TYPES
    found = _Targets(tie_source=_find_input_embedding(tensors))
    for name, op in adapter.targets.items():
        info = tensors.get(name)
        if info is None and name in OUTPUT_EMBEDDINGS and found.tie_source is not None:
            # tied embeddings: the output layer shares the input embedding, which the base stores once
            info = tensors[found.tie_source]
            found.untie = True
            found.notes.append(f"{name} was tied to {found.tie_source}: it is written on its own and the tie is "
                               "removed")
        if info is None and op.optional:
            continue
        if info is None:
            hint = " (a saved full tensor)" if op.replace is not None and not op.deltas else ""
            found.problems.append(f"{name}: the adapter's {op.module}{hint} has no tensor {name!r} in BASE")
            continue
        w_shape = _target_shape(name, op, info, keep, found)
        if w_shape is None:
            continue
        fitted, problems = _fit_target(op, w_shape, info, conv1d)
        found.problems += problems
        found.resolved[name] = (fitted, info)
    return found


def _target_shape(name: str, op: TargetOps, info, keep: bool, found: _Targets) -> tuple[int, ...] | None:
    """The shape the target gives the tensor (a saved full tensor may resize it); None where it cannot."""
    w_shape = info.shape
    if op.replace is None:
        return w_shape
    r_shape = tuple(op.replace.shape)
    if r_shape != w_shape:
        resizable = op.may_resize and len(r_shape) == len(w_shape) >= 1 and r_shape[1:] == w_shape[1:]
        if not resizable:
            found.problems.append(f"{name}: the adapter's full tensor has shape {list(r_shape)}, the base "
                                  f"{list(w_shape)}")
            return None
        if keep and isinstance(info, QuantizedTensor):
            found.problems.append(f"{name}: resized by the adapter, which BASE's {info.dtype} format cannot follow; "
                                  "merge with --dtype")
            return None
        found.notes.append(f"{name}: resized from {w_shape[0]} to {r_shape[0]} rows by the adapter")
    return r_shape


def untie_embeddings(base: BaseModel, found: _Targets, keep: bool, out_dtype: str | None) -> None:
    """An input embedding changed in a tied model: the output layer keeps the original, untied (an added entry)."""
    tie_source, tensors = found.tie_source, base.tensors
    if tie_source not in found.resolved or any(n in tensors for n in OUTPUT_EMBEDDINGS):
        return
    op, info = found.resolved[tie_source]
    changes_values = op.replace is not None or op.deltas or op.dora_magnitude is not None or op.multiply is not None
    if not changes_values or any(n in found.resolved for n in OUTPUT_EMBEDDINGS):
        return
    if keep and isinstance(info, QuantizedTensor):
        found.problems.append(f"{tie_source}: changed, and tied to the output layer, which would need an untied "
                              f"copy in BASE's {info.dtype} format; merge with --dtype")
    elif base.config.get("tie_word_embeddings", _nested_get(base.config, "tie_word_embeddings")) is not False:
        head = OUTPUT_EMBEDDINGS[0]
        found.added[head] = Entry(head, out_dtype or info.dtype, info.shape, info, None,
                                  note=f"untied copy of {tie_source}")
        found.untie = True
        found.notes.append(f"{tie_source} was tied to {head}: {head} keeps the original and the tie is removed")


def raise_problems(problems: list[str]) -> None:
    """Every reason the adapter does not fit, at once."""
    if not problems:
        return
    absent = sum(1 for p in problems if p.endswith("in BASE") and "has no tensor" in p)
    kinds = (f": {absent} target{'s' if absent != 1 else ''} BASE does not have, {len(problems) - absent} that "
             "do not fit the tensor of that name" if absent and absent < len(problems) else
             ": targets BASE does not have" if absent else "")
    raise PlanError(
        f"the adapter does not fit BASE ({len(problems)} problem{'s' if len(problems) > 1 else ''}{kinds}):",
        problems,
        "check that ADAPTER was trained on this BASE (the adapter's base_model_name_or_path says which model)",
    )


def lay_out(base: BaseModel, found: _Targets, keep: bool, out_dtype: str | None,
            quantize: Quantization | None) -> list[OutputShard]:
    """BASE's shards as OUT's: each tensor where BASE keeps it, in its file order (a quantized tensor's parts where
    BASE keeps them, or one tensor where its codes were), then the tensors the plan adds."""
    shards: list[tuple[str, list[Entry], dict, list[str]]] = []  # each file's name, entries, metadata, order
    tensor_shard: dict[str, str] = {}
    for header in base.shards:
        entries, order = [], []
        for name, info in header.tensors.items():  # in file order
            entry, stored = _place(name, info, base, found, keep, out_dtype, quantize)
            if entry is not None:
                entries.append(entry)
                tensor_shard[entry.name] = header.path.name
            order += stored
        shards.append((header.path.name, entries, {**header.metadata, "format": "pt"}, order))
    if quantize and not any(isinstance(e.base, Fp8Quantized) for s in shards for e in s[1]):
        raise QuantizationError(
            f"--quantize {quantize.method}: none of BASE's weights can be stored that way (a Linear's weight in whole "
            "128×128 blocks, of a module transformers loads as FP8)", list(quantize.notes),
            "merge without --quantize")
    added = dict(found.added)
    for name in sorted(set(found.resolved) - set(base.tensors)):
        op, info = found.resolved[name]
        shape = tuple(op.replace.shape) if op.replace is not None else info.shape
        added[name] = Entry(name, _final_dtype(info.dtype, out_dtype), shape, info, op, note=op.kind)
    for name, entry in added.items():
        # the new tensor goes into the shard of the tensor it was tied to, after BASE's own
        _, entries, _, order = next(s for s in shards if s[0] == tensor_shard[entry.base.name])
        entries.append(entry)
        order.append(entry.name)
    return [OutputShard(name, tuple(entries), metadata, tuple(order)) for name, entries, metadata, order in shards]


def _final_dtype(src: str, out_dtype: str | None) -> str:
    return out_dtype if out_dtype and src in FLOAT_DTYPES else src


def _place(name: str, info, base: BaseModel, found: _Targets, keep: bool, out_dtype: str | None,
           quantize: Quantization | None) -> tuple[Entry | None, list[str]]:
    """BASE's stored tensor ``name`` in OUT: the entry it starts (None: a part of an entry placed at its codes) and
    the stored names it puts in the file's order."""
    quant = base.quantization
    group = quant.owner(name) if quant else None
    if group is not None and (group.name in found.resolved or not keep):  # written as one entry, at its codes
        codes = group.parts[0]
        entry = None
        if name == codes.name:
            op = found.resolved[group.name][0] if group.name in found.resolved else None
            entry = Entry(group.name, out_dtype or group.dtype, group.shape, group, op,
                          note=op.kind if op else "dequantize")
        if not keep:  # dequantized: one tensor where the codes were
            return entry, [group.name] if name == codes.name else []
        if info.path != codes.path:  # a part BASE keeps in another file: written with the codes
            return entry, []
        return entry, [name] + ([p.name for p in group.parts[1:] if p.path != codes.path] if name == codes.name else [])
    if quantize and quantize.takes(name, info):  # FP8 codes and their scales, where BASE has the tensor
        op = found.resolved[name][0] if name in found.resolved else None
        q = quantize.quantized(name, info)
        return Entry(name, q.dtype, info.shape, q, op, note=op.kind if op else "quantize"), [p.name for p in q.parts]
    dt = _final_dtype(info.dtype, out_dtype)
    if name in found.resolved:
        op, _ = found.resolved[name]
        shape = tuple(op.replace.shape) if op.replace is not None else info.shape
        return Entry(name, dt, shape, info, op, note=op.kind), [name]
    return Entry(name, dt, info.shape, info, None, note="copy" if dt == info.dtype else "convert"), [name]


def rewrite_config(base: BaseModel, shards: list[OutputShard], out_dtype: str | None, found: _Targets,
                   quantize: Quantization | None) -> tuple[dict, list[str]]:
    """OUT's config.json, and each change to BASE's in words."""
    quant = base.quantization
    config, changes = _new_config(base.config, shards, out_dtype, found.untie, found.tie_source)
    if quant is not None and out_dtype is not None:
        _drop_quantization(config, changes, quant.method)
    if quantize:
        config["quantization_config"] = quantize.config(base.tensors)
        changes.append(f"quantization_config: added ({quantize.method}, e4m3 with 128×128 block scales)")
    return config, changes


def _quantization_notes(base: BaseModel, adapter: Adapter, out_dtype: str | None) -> list[str]:
    """What happens to a quantized BASE, and the 16-bit model behind a 4-bit one, when it can be named."""
    quant = base.quantization
    notes = []
    if quant is not None and out_dtype is None:
        notes.append(f"BASE is {quant.description}: merged tensors are written back in that format, with fresh "
                     "scales for the blocks whose values changed; the other tensors are copied as stored")
    elif quant is not None:
        notes.append(f"BASE is {quant.description}: its {len(quant.tensors)} quantized tensors are dequantized to "
                     f"{DTYPES[out_dtype].config_name}, and config.json loses its quantization_config")
    if quant is not None and quant.method == "bitsandbytes":
        names = [m.config.get("base_model_name_or_path") for m in adapter.members] + [base.source.repo_id]
        original = next((o for o in (sixteen_bit_original(n) for n in names if isinstance(n, str)) if o), None)
        where = f" ({original!r})" if original else ""
        bits = "4-bit" if any(t.dtype != "INT8" for t in quant.tensors.values()) else "8-bit"
        notes.append(f"the adapter was trained against a {bits} quantization of a 16-bit model{where}: merged into that "
                     "16-bit model, it gives the weights before quantization plus the adapter, as QLoRA fine-tunes are "
                     f"usually deployed; merged here into the dequantized {bits} weights, the quantization's error stays")
    return notes


def _drop_quantization(config: dict, changes: list[str], method: str) -> None:
    for holder, where in ((config, ""), (config.get("text_config"), "text_config.")):
        if isinstance(holder, dict) and holder.pop("quantization_config", None) is not None:
            changes.append(f"{where}quantization_config: {method} -> removed (dequantized)")


def _nested_get(config: dict, key: str):
    sub = config.get("text_config")
    return sub.get(key) if isinstance(sub, dict) else None


def _set_config(config: dict, key: str, value, changes: list[str]) -> None:
    """Set ``key`` where the config keeps it (top level, or text_config for multimodal models)."""
    holders = [config] + ([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])
    targets = [h for h in holders if key in h] or [config]
    for h in targets:
        if h.get(key) != value:
            where = "text_config." if h is not config else ""
            changes.append(f"{where}{key}: {h.get(key)!r} -> {value!r}")
            h[key] = value


def _new_config(config: dict, shards: list[OutputShard], out_dtype: str | None, untie: bool, tie_source: str | None):
    import copy

    new = copy.deepcopy(config)
    changes: list[str] = []
    if out_dtype:
        name = DTYPES[out_dtype].config_name
        keys = [k for k in ("dtype", "torch_dtype") if k in new] or ["torch_dtype"]
        for k in keys:
            _set_config(new, k, name, changes)
    if untie:
        _set_config(new, "tie_word_embeddings", False, changes)
    if tie_source:
        shape = next((e.shape for s in shards for e in s.entries if e.name == tie_source), None)
        vocab = new.get("vocab_size", _nested_get(new, "vocab_size"))
        if shape and isinstance(vocab, int) and shape[0] != vocab and any(
            e.ops is not None and e.ops.replace is not None and e.shape[0] != e.base.shape[0]
            for s in shards for e in s.entries
        ):
            _set_config(new, "vocab_size", shape[0], changes)
    return new, changes


def _check_vocab(plan: Plan, tie_source: str | None) -> None:
    """Input and output embeddings must agree on the vocabulary after a resize."""
    rows = {e.name: e.shape[0] for e in plan.entries if e.name in OUTPUT_EMBEDDINGS or e.name == tie_source}
    if len(set(rows.values())) > 1:
        raise PlanError(
            "the merged model would have embeddings of different vocabulary sizes:",
            [f"{n}: {r} rows" for n, r in rows.items()],
            "the adapter resized one embedding but not the other; save both with modules_to_save",
        )
