"""From headers alone: which output tensor comes from where, and every reason it cannot be done.

Nothing here reads tensor data. Every adapter target must land on exactly one base tensor with a
compatible shape; all offenders are collected and reported at once, before anything is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .adapter import Adapter, AddScaled, LowRank, TargetOps
from .dtypes import DTYPES, FLOAT_DTYPES, OUTPUT_DTYPES
from .errors import PlanError, QuantizationError
from .quant import QuantizedTensor, sixteen_bit_original
from .quant.fp8 import Fp8Quantized
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


@dataclass
class Entry:
    """One tensor of an output shard."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    base: TensorInfo | QuantizedTensor | None  # the base tensor it starts from (None: entirely from the adapter)
    ops: TargetOps | None = None  # None: the base tensor as it is (copied, or converted)
    note: str = ""

    @property
    def requantized(self) -> bool:
        """Written in BASE's quantized format (its codes and scales), not as one tensor of a float dtype."""
        return isinstance(self.base, QuantizedTensor) and self.dtype == self.base.dtype

    @property
    def stored(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """The tensors written for it, in order: (name, dtype, shape)."""
        if self.requantized:
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
        """How many rows make a float64 block of at most ``block_bytes`` (at least one). A tensor written in a
        quantized format is taken in whole rows of its scale blocks where that costs at most four times as much
        (``needs_prepass`` says when it does not)."""
        step = max(1, block_bytes // (8 * self.width))
        if self.requantized:
            unit = self.base.row_unit
            if unit <= step:
                step -= step % unit
            elif unit * self.width * 8 <= 4 * block_bytes:
                step = unit
        return step

    def needs_prepass(self, step: int) -> bool:
        """Written in a quantized format whose scale blocks span more rows than a block of ``step``: each block's
        scale must be found over all of its rows first."""
        return self.requantized and (step % self.base.row_unit != 0 or self.base.global_scale) and step < self.shape[0]


@dataclass
class OutputShard:
    name: str
    entries: list[Entry]
    metadata: dict[str, str]
    # the stored tensors' names in file order, where OUT keeps BASE's (None: the entries' order): a quantized
    # tensor's codes and scales may lie apart, and a merge that changes nothing must give BASE's bytes
    order: list[str] | None = None

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def stored(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """Every tensor the file holds, in file order: (name, dtype, shape)."""
        parts = {s[0]: s for e in self.entries for s in e.stored}
        return list(parts.values()) if self.order is None else [parts[n] for n in self.order]


@dataclass
class Plan:
    base: BaseModel
    adapter: Adapter
    shards: list[OutputShard]
    config: dict
    config_changes: list[str]
    notes: list[str] = field(default_factory=list)
    sharded: bool = True
    index_name: str = INDEX_NAME  # the index OUT gets when sharded
    role: str = "BASE"  # what the plan starts from, as reports name it: MERGED when unmerging

    @property
    def formula(self) -> str:
        """What each changed element is, in words for the report."""
        return "W − s·B·A" if self.role == "MERGED" else "W + s·B·A"

    @property
    def entries(self) -> list[Entry]:
        return [e for s in self.shards for e in s.entries]

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
    if not numbers and (op.deltas or op.dora_magnitude is not None):
        return op, [f"{where}: base dtype {info.dtype} is not floating point; LoRA cannot be added to it"]
    deltas: list[LowRank | AddScaled] = []
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
    return replace(op, deltas=deltas, dora_transposed=dora_transposed), problems


def make_plan(base: BaseModel, adapter: Adapter, dtype: str | None = None,
              quantize: Quantization | None = None) -> Plan:
    """Match the adapter against the base and lay out the output, or raise PlanError with every problem;
    ``quantize``: which of BASE's float weights OUT stores quantized, and how (``quantize.py``)."""
    out_dtype = OUTPUT_DTYPES[dtype] if dtype else None
    tensors = base.tensors
    conv1d = str(base.config.get("model_type", "")) in CONV1D_MODEL_TYPES
    quant = base.quantization
    if quantize and (quant is not None or dtype):
        raise QuantizationError(
            f"--quantize {quantize.method} writes a float BASE quantized; BASE is {quant.description}" if quant else
            f"--quantize {quantize.method} and --dtype {dtype} both say what OUT's weights are", [],
            "merge a quantized BASE keeping its format (or with --dtype); give one of --quantize and --dtype")
    keep = quant is not None and out_dtype is None  # merged tensors written back in BASE's quantized format
    if keep and not quant.requantizable:
        raise QuantizationError(
            f"BASE is {quant.description}: lora-merge merges it into a dequantized checkpoint only (requantizing "
            "would change the weights more than the adapter does), and --dtype says into which dtype", [],
            "pass --dtype bfloat16 (or float16, float32)")
    problems: list[str] = []
    notes: list[str] = list(adapter.notes) + _quantization_notes(base, adapter, out_dtype)
    notes += list(quantize.notes) if quantize else []
    tie_source = _find_input_embedding(tensors)
    added: dict[str, Entry] = {}  # tensors the base does not store (an untied lm_head)
    resolved: dict[str, tuple[TargetOps, TensorInfo]] = {}
    untie = False

    for name, op in adapter.targets.items():
        info = tensors.get(name)
        if info is None and name in OUTPUT_EMBEDDINGS and tie_source is not None:
            # tied embeddings: the output layer shares the input embedding, which the base stores once
            info = tensors[tie_source]
            untie = True
            notes.append(f"{name} was tied to {tie_source}: it is written on its own and the tie is removed")
        if info is None:
            hint = ""
            if op.replace is not None and not op.deltas:
                hint = " (a saved full tensor)"
            problems.append(f"{name}: the adapter's {op.module}{hint} has no tensor {name!r} in BASE")
            continue
        w_shape = info.shape
        if op.replace is not None:
            r_shape = tuple(op.replace.shape)
            if r_shape != w_shape:
                resizable = op.may_resize and len(r_shape) == len(w_shape) >= 1 and r_shape[1:] == w_shape[1:]
                if not resizable:
                    problems.append(f"{name}: the adapter's full tensor has shape {list(r_shape)}, the base {list(w_shape)}")
                    continue
                if keep and isinstance(info, QuantizedTensor):
                    problems.append(f"{name}: resized by the adapter, which BASE's {info.dtype} format cannot "
                                    "follow; merge with --dtype")
                    continue
                notes.append(f"{name}: resized from {w_shape[0]} to {r_shape[0]} rows by the adapter")
            w_shape = r_shape
        fitted, found = _fit_target(op, w_shape, info, conv1d)
        problems += found
        resolved[name] = (fitted, info)

    # An input embedding changed in a tied model: the output layer keeps the original, untied.
    if tie_source in resolved and not any(n in tensors for n in OUTPUT_EMBEDDINGS):
        op, info = resolved[tie_source]
        changes_values = op.replace is not None or op.deltas or op.dora_magnitude is not None
        head = next((n for n in OUTPUT_EMBEDDINGS if n in resolved), None)
        if changes_values and head is None:
            if keep and isinstance(info, QuantizedTensor):
                problems.append(f"{tie_source}: changed, and tied to the output layer, which would need an untied "
                                f"copy in BASE's {info.dtype} format; merge with --dtype")
            elif base.config.get("tie_word_embeddings", _nested_get(base.config, "tie_word_embeddings")) is not False:
                head = OUTPUT_EMBEDDINGS[0]
                added[head] = Entry(head, out_dtype or info.dtype, info.shape, info, None,
                                    note=f"untied copy of {tie_source}")
                untie = True
                notes.append(f"{tie_source} was tied to {head}: {head} keeps the original and the tie is removed")

    if problems:
        absent = sum(1 for p in problems if p.endswith("in BASE") and "has no tensor" in p)
        kinds = (f": {absent} target{'s' if absent != 1 else ''} BASE does not have, {len(problems) - absent} that "
                 "do not fit the tensor of that name" if absent and absent < len(problems) else
                 ": targets BASE does not have" if absent else "")
        raise PlanError(
            f"the adapter does not fit BASE ({len(problems)} problem{'s' if len(problems) > 1 else ''}{kinds}):",
            problems,
            "check that ADAPTER was trained on this BASE (the adapter's base_model_name_or_path says which model)",
        )

    def final_dtype(src: str) -> str:
        return out_dtype if out_dtype and src in FLOAT_DTYPES else src

    shards: list[OutputShard] = []
    tensor_shard: dict[str, str] = {}
    for header in base.shards:
        entries, order = [], []
        for name, info in header.tensors.items():  # in file order
            group = quant.owner(name) if quant else None
            if group is not None and (group.name in resolved or not keep):  # written as one entry, at its codes
                codes = group.parts[0]
                if name == codes.name:
                    op = resolved[group.name][0] if group.name in resolved else None
                    entries.append(Entry(group.name, out_dtype or group.dtype, group.shape, group, op,
                                         note=op.kind if op else "dequantize"))
                    tensor_shard[group.name] = header.path.name
                if not keep:  # dequantized: one tensor where the codes were
                    order += [group.name] if name == codes.name else []
                elif info.path == codes.path:  # in its format: each part where BASE keeps it
                    order.append(name)
                    if name == codes.name:  # and the parts BASE keeps in another file, with the codes
                        order += [p.name for p in group.parts[1:] if p.path != codes.path]
                continue
            dt = final_dtype(info.dtype)
            if quantize and quantize.takes(name, info):  # FP8 codes and their scales, where BASE has the tensor
                op = resolved[name][0] if name in resolved else None
                q = quantize.quantized(name, info)
                entries.append(Entry(name, q.dtype, info.shape, q, op, note=op.kind if op else "quantize"))
                order += [p.name for p in q.parts]
                tensor_shard[name] = header.path.name
                continue
            if name in resolved:
                op, _ = resolved[name]
                shape = tuple(op.replace.shape) if op.replace is not None else info.shape
                entries.append(Entry(name, dt, shape, info, op, note=op.kind))
            else:
                entries.append(Entry(name, dt, info.shape, info, None, note="copy" if dt == info.dtype else "convert"))
            order.append(name)
            tensor_shard[name] = header.path.name
        metadata = dict(header.metadata)
        metadata["format"] = "pt"
        shards.append(OutputShard(header.path.name, entries, metadata, order))
    if quantize and not any(isinstance(e.base, Fp8Quantized) for s in shards for e in s.entries):
        raise QuantizationError(
            f"--quantize {quantize.method}: none of BASE's weights can be stored that way (a Linear's weight in whole "
            "128×128 blocks, of a module transformers loads as FP8)", list(quantize.notes),
            "merge without --quantize")
    for name in sorted(set(resolved) - set(tensors)):
        op, info = resolved[name]
        shape = tuple(op.replace.shape) if op.replace is not None else info.shape
        added[name] = Entry(name, final_dtype(info.dtype), shape, info, op, note=op.kind)
    for name, entry in added.items():
        # the new tensor goes into the shard of the tensor it was tied to, after BASE's own
        shard = next(s for s in shards if s.name == tensor_shard[entry.base.name])
        shard.entries.append(entry)
        shard.order.append(entry.name)

    config, changes = _new_config(base.config, shards, out_dtype, untie, tie_source)
    if quant is not None and out_dtype is not None:
        _drop_quantization(config, changes, quant.method)
    if quantize:
        config["quantization_config"] = quantize.config(tensors)
        changes.append(f"quantization_config: added ({quantize.method}, e4m3 with 128×128 block scales)")
    plan = Plan(base, adapter, shards, config, changes, notes, sharded=len(base.shards) > 1 or base.index_metadata != {},
                index_name=base.index_name)
    _check_vocab(plan, tie_source)
    return plan


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
