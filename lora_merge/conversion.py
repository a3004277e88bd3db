"""transformers' conversion tables followed on names and shapes: the model in memory, as made from the files.

transformers 5 loads a checkpoint through a list of renamings and converters (``get_model_conversion_mapping``):
per-expert tensors stacked into one parameter (``MergeModulelist``), gate and up joined (``Concatenate``),
fused tensors cut (``Chunk``, ``Split``), axes swapped (``Transpose``), halves interleaved. Here the same
list is taken from the model class itself (built on the meta device: no memory, no weights) and run
on index vectors instead of tensors, so that each in-memory tensor is known as pieces of on-disk tensors.
This module is imported only when an adapter's names do not match BASE's files.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np

from .errors import LayoutError, first_line
from .layout import Along, Fixed, ModelLayout, ModelTensor, Piece
from .sources import BaseModel

log = logging.getLogger("lora_merge")
EXTRA = "pip install 'lora-merge[transformers]'"


def model_layout(base: BaseModel) -> ModelLayout:
    """Where every tensor of the model transformers builds from BASE comes from in BASE's files."""
    transformers = _import_transformers()
    try:
        return _model_layout(transformers, base)
    except LayoutError:
        raise
    except Exception as e:  # transformers' own code, run on a config.json from anywhere
        raise LayoutError(f"transformers could not say how {base.config.get('model_type')!r} is stored "
                          f"(from BASE's config.json{_naming(e, base.config)}): {first_line(e)}", [], _RESTORE) from e


def _model_layout(transformers, base: BaseModel) -> ModelLayout:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    model = _meta_model(transformers, base)
    mapping = get_model_conversion_mapping(model)
    renamings = [w for w in mapping if isinstance(w, WeightRenaming)]
    converters = [w for w in mapping if isinstance(w, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    memory = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    renamed: dict[str, str] = {}
    groups: dict[str, tuple[object, dict[str, list[str]]]] = {}
    for key in sorted(base.tensors, key=dot_natural_key):  # the order transformers reads them in
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, memory)
        if name not in memory and key in memory:  # as transformers does: keep the name, adjusting the prefix only
            name, pattern = rename_source_key(key, [], [], model.base_model_prefix, memory)
        if name not in memory:
            continue  # not part of the model (a buffer, an unused head): copied as it is
        if pattern is None:
            renamed[name] = key
        else:
            groups.setdefault(name, (by_pattern[pattern], {}))[1].setdefault(pattern, []).append(key)

    # where a quantized checkpoint's scale beside a renamed tensor goes (a renaming may match the tensor's name only)
    scaled = {**memory, **{n + "_scale_inv": () for n in renamed}}
    carried = frozenset(key for name, key in renamed.items() if rename_source_key(
        key + "_scale_inv", renamings, converters, model.base_model_prefix, scaled)[0] == name + "_scale_inv")
    tensors: dict[str, ModelTensor] = {}
    for name, key in renamed.items():
        tensors[name] = ModelTensor(name, base.tensors[key].shape, [_leaf(key, base.tensors[key].shape).pieces[0]])
    for first, (converter, collected) in groups.items():
        try:
            made = _convert(converter, first, collected, base, memory, model.config)
        except _CannotFollow as e:
            for target in _targets_of(converter, first):
                tensors[target] = ModelTensor(target, memory.get(target, ()), [], why_not=str(e))
            continue
        for target, sym in made.items():
            tensors[target] = ModelTensor(target, sym.shape, sym.pieces)
    for name, t in tensors.items():  # where this reading of the tables and the model disagree, never guess
        if t.why_not:
            continue
        if memory.get(name) != t.shape:
            t.why_not = f"transformers' conversion gives {list(t.shape)} but the model has {list(memory.get(name, ()))}"
        elif not _covers(t):
            t.why_not = "transformers' conversion does not make each of its elements from exactly one stored element"
    params: dict[str, list[str]] = {}
    turned: dict[str, bool] = {}
    linears: set[str] = set()
    forms: dict[str, str] = {}
    for module_name, module in model.named_modules():
        names = [n for n, _ in module.named_parameters(recurse=False)]
        if names:
            params[module_name] = names
            turned[module_name] = bool(getattr(module, "is_transposed", False))  # peft's own default
        if _plain_linear(module):
            linears.add(module_name)
        if module_name.endswith(".experts"):
            forms[module_name] = _experts_form(module, model.config)
    return ModelLayout(_describe(transformers, base), tensors, memory, params, turned, frozenset(linears), carried,
                       forms)


def _experts_form(module, config) -> str:
    """How an experts module differs from what transformers' FP8Experts holds in its place ('' where it does not):
    transformers' experts interface with (E, 2I, H) gate and up concatenated and (E, H, I), sized by the config."""
    if not hasattr(module, "is_transposed"):
        return f"{type(module).__name__} has a forward of its own, not transformers' experts interface"
    if module.is_transposed:
        return "stored (experts, in, out), FP8Experts takes (experts, out, in)"
    if not getattr(module, "is_concatenated", True):
        return "gate and up interleaved, FP8Experts takes them one after the other"
    if getattr(module, "has_post_expert_norm", False):
        return "a norm after each expert, which FP8Experts has not"
    text = getattr(module, "config", None) or config.get_text_config()

    def first(*names):  # as FP8Experts reads the config
        return next((getattr(text, n) for n in names if hasattr(text, n)), None)

    experts, inner, hidden = first("num_local_experts", "num_experts"), first("moe_intermediate_size",
                                                                           "intermediate_size"), first("hidden_size")
    gate = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    want = {gate: (experts, (2 if gate == "gate_up_proj" else 1) * (inner or 0), hidden),
            "down_proj": (experts, hidden, inner)}
    got = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
    if any(got.get(n) != shape for n, shape in want.items()):
        return f"its parameters {got} are not the (experts, out, in) FP8Experts makes from the config, {want}"
    return ""


def _plain_linear(module) -> bool:
    """A Linear as transformers' quantizers take one: ``nn.Linear`` itself (or a grouped one), not a subclass such
    as ``nn.MultiheadAttention``'s ``out_proj``."""
    import torch

    linear = torch.nn.Linear
    return type(module) is linear or isinstance(module, linear) and "GroupedLinear" in type(module).__name__


def _describe(transformers, base: BaseModel) -> str:
    return f"transformers {transformers.__version__}'s conversion for {base.config.get('model_type')!r}"


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise LayoutError(
            "the adapter names tensors of the model transformers builds in memory, which BASE's files store "
            "under other names or layouts, and transformers is not installed to say how",
            [], f"install it: {EXTRA}") from None
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise LayoutError(f"transformers {transformers.__version__} has no conversion tables (they came with 5.0)",
                          [], f"upgrade it: {EXTRA}")
    return transformers


def _meta_model(transformers, base: BaseModel):
    """The model class BASE's config names, built on the meta device: its parameters' names and shapes, no data."""
    import torch

    model_type = base.config.get("model_type")
    if not (base.path / "config.json").is_file() or not model_type:
        raise LayoutError("BASE has no config.json with a model_type, so the model in memory is unknown", [],
                          "add the config.json the model was published with")
    architectures = base.config.get("architectures")
    if not isinstance(model_type, str) or not (architectures is None or (
            isinstance(architectures, list) and all(isinstance(a, str) for a in architectures))):
        key, value = ("model_type", model_type) if not isinstance(model_type, str) else ("architectures", architectures)
        raise LayoutError(f"BASE's config.json: {key} must be {'a string' if key == 'model_type' else 'a list of names'}"
                          f", found {value!r}", [], _RESTORE)
    quiet = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                config = transformers.AutoConfig.from_pretrained(base.path)
            except Exception as e:  # an unknown type, or a value its config class refuses, in many exception types
                if model_type not in transformers.CONFIG_MAPPING:
                    raise LayoutError(f"transformers {transformers.__version__} does not know model_type "
                                      f"{model_type!r} ({first_line(e)})", [],
                                      "upgrade transformers, or merge into a model it knows") from e
                raise LayoutError(f"transformers cannot read BASE's config.json{_naming(e, base.config)}: "
                                  f"{first_line(e)}", [], _RESTORE) from e
            classes = [getattr(transformers, a, None) for a in (getattr(config, "architectures", None) or [])]
            cls = next((c for c in classes if c is not None), None) or _auto_class(transformers, config)
            try:
                with torch.device("meta"):
                    return cls(config)
            except Exception as e:  # a model class fails in many ways; the user needs its name and the first line
                raise LayoutError(f"transformers cannot build {cls.__name__} for {model_type!r} from BASE's "
                                  f"config.json{_naming(e, base.config)}: {first_line(e)}", [], _RESTORE) from e
    finally:
        transformers.utils.logging.set_verbosity(quiet)


_RESTORE = "check that config.json is the one the model was published with"


def _naming(e: BaseException, config: dict) -> str:
    """" (key 'hidden_size')" when the error names a key of config.json (nested ones by their full path), else
    nothing."""
    import re

    text = str(e)
    named = [full for full, leaf in _keys(config) if re.search(rf"(?<![\w.]){re.escape(leaf)}(?!\w)", text)]
    return f" (key {min(named, key=lambda k: (k.count('.'), -len(k)))!r})" if named else ""


def _keys(config: dict, prefix: str = "") -> list[tuple[str, str]]:
    """(full path, last part) of every key of a config, nested ones included."""
    found = []
    for k, v in config.items():
        found.append((prefix + str(k), str(k)))
        found += _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else []
    return found


def _auto_class(transformers, config):
    for auto in ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModel"):
        mapping = getattr(transformers, auto)._model_mapping
        if type(config) in mapping:
            return mapping[type(config)]
    raise LayoutError(f"transformers has no model class for {type(config).__name__}", [],
                      "merge into a model transformers can load")


# --------------------------------------------------------------------------- tensors as index vectors


@dataclass
class _Sym:
    """A tensor under conversion, as its shape and the on-disk pieces it is made of."""

    shape: tuple[int, ...]
    pieces: list[Piece]


class _CannotFollow(Exception):
    """A conversion this module does not know how to follow; the tensors it makes cannot take an adapter."""


def _arange(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def _leaf(name: str, shape: tuple[int, ...]) -> _Sym:
    return _Sym(tuple(shape), [Piece(name, tuple(Along(i, _arange(n), _arange(n)) for i, n in enumerate(shape)))])


def _moved(axis: Along | Fixed, change) -> Along | Fixed | None:
    """An axis with its in-memory positions passed through ``change`` (positions -> positions, -1 dropped)."""
    if isinstance(axis, Fixed):
        (position,) = change(np.array([axis.position]))
        return Fixed(int(position)) if position >= 0 else None
    positions = change(axis.memory)
    keep = positions >= 0
    if not keep.any():
        return None
    return Along(axis.axis, positions[keep], axis.disk[keep])


def _map_axis(sym: _Sym, dim: int, size: int, change) -> _Sym:
    pieces = []
    for p in sym.pieces:
        moved = _moved(p.axes[dim], change)
        if moved is not None:
            pieces.append(Piece(p.disk, p.axes[:dim] + (moved,) + p.axes[dim + 1:]))
    return _Sym(sym.shape[:dim] + (size,) + sym.shape[dim + 1:], pieces)


def _stack(syms: list[_Sym], dim: int) -> _Sym:
    shapes = {s.shape for s in syms}
    if len(shapes) != 1:
        raise _CannotFollow(f"stacking tensors of different shapes {sorted(shapes)}")
    (shape,) = shapes
    pieces = [Piece(p.disk, p.axes[:dim] + (Fixed(i),) + p.axes[dim:]) for i, s in enumerate(syms) for p in s.pieces]
    return _Sym(shape[:dim] + (len(syms),) + shape[dim:], pieces)


def _cat(syms: list[_Sym], dim: int) -> _Sym:
    if len({s.shape[:dim] + s.shape[dim + 1:] for s in syms}) != 1:
        raise _CannotFollow(f"joining tensors of shapes {[list(s.shape) for s in syms]} along axis {dim}")
    pieces, offset = [], 0
    for s in syms:
        pieces += _map_axis(s, dim, 0, lambda x, o=offset: x + o).pieces
        offset += s.shape[dim]
    shape = syms[0].shape
    return _Sym(shape[:dim] + (offset,) + shape[dim + 1:], pieces)


def _narrow(sym: _Sym, dim: int, start: int, length: int) -> _Sym:
    return _map_axis(sym, dim, length, lambda x: np.where((x >= start) & (x < start + length), x - start, -1))


def _transpose(sym: _Sym, d0: int, d1: int) -> _Sym:
    def swap(seq):
        seq = list(seq)
        seq[d0], seq[d1] = seq[d1], seq[d0]
        return tuple(seq)

    return _Sym(swap(sym.shape), [Piece(p.disk, swap(p.axes)) for p in sym.pieces])


def _permute(sym: _Sym, dim: int, order: np.ndarray) -> _Sym:
    """Position j of the result is position ``order[j]`` of ``sym`` along ``dim``."""
    inverse = np.empty_like(order)
    inverse[order] = _arange(len(order))
    return _map_axis(sym, dim, sym.shape[dim], lambda x: inverse[x])


def _one(value) -> _Sym:
    return value[0] if isinstance(value, list) else value


@dataclass(frozen=True)
class _Chain:
    """What a converter's operations see besides the tensors: its patterns, the in-memory shapes and the config."""

    sources: list[str]
    targets: list[str]
    first: str  # the first in-memory name it makes
    memory: dict  # in-memory shapes by full name
    config: object


def _convert(converter, first: str, collected: dict[str, list[str]], base: BaseModel, memory: dict, config) -> dict:
    """``converter``'s operations on the collected on-disk tensors, as transformers' ``WeightConverter.convert``
    runs them; returns each in-memory tensor it makes by full name."""
    from transformers import core_model_loading as c

    chain = _Chain(list(converter.source_patterns), list(converter.target_patterns), first, memory, config)
    state: dict[str, object] = {p: [_leaf(k, base.tensors[k].shape) for k in keys] for p, keys in collected.items()}
    for op in converter.operations:
        # by the classes this transformers has (older ones lack Interleave)
        step = next((f for names, f in _STEPS if any(getattr(c, n, None) is type(op) for n in names)), None)
        if step is None:
            raise _CannotFollow(f"transformers makes it with {type(op).__name__}, which lora-merge cannot follow")
        state = step(op, state, chain)
    # the targets' full names: the first target's name around each pattern, as transformers names them
    full = first.replace("*.", "0.") if "*." in first else first
    prefix, _, suffix = next((full.partition(k) for k in state if k in full), ("", "", ""))
    return {prefix + key + suffix: _one(value) for key, value in state.items()}


def _merge_module_list(op, state: dict, chain: _Chain) -> dict:
    if len(state) == 1 and len(chain.targets) != 1:
        raise _CannotFollow(f"{op!r} onto several targets")
    return {(chain.targets[0] if len(state) == 1 else p): (_stack(v, op.dim) if isinstance(v, list) else v)
            for p, v in state.items()}


def _concatenate(op, state: dict, chain: _Chain) -> dict:
    if len(chain.targets) != 1:
        raise _CannotFollow(f"{op!r} onto several targets")
    parts = [x for p in chain.sources if p in state for x in (state[p] if isinstance(state[p], list) else [state[p]])]
    return {chain.targets[0]: _cat(parts, op.dim)}


def _split(op, state: dict, chain: _Chain, chunk: bool) -> dict:
    (value,) = state.values()
    sym = _one(value)
    targets = chain.targets
    if not chunk:
        sizes = [chain.memory[chain.first.replace(targets[0], t)][op.dim] for t in targets]
        names = targets
    else:
        names = op.get_target_patterns(targets, config=chain.config)
        step = -(-sym.shape[op.dim] // len(names))  # torch.chunk's chunk size
        sizes = [max(0, min(step, sym.shape[op.dim] - i * step)) for i in range(len(names))]
    starts = np.cumsum([0] + sizes[:-1])
    return {t: _narrow(sym, op.dim, int(s), n) for t, s, n in zip(names, starts, sizes) if n}


def _transposed(op, state: dict, chain: _Chain) -> dict:
    (value,) = state.values()
    sources, targets = chain.sources, chain.targets
    target = targets[0] if len(targets) == 1 else sources[0] if len(sources) == 1 else None
    if target is None:
        raise _CannotFollow(f"{op!r} in a chain of several sources and targets")
    sym = _one(value)
    if op.check_dims and sym.shape == chain.memory.get(chain.first):
        return {target: sym}
    return {target: _transpose(sym, op.dim0, op.dim1)}


# each operation transformers runs, by its class names, and how the conversion follows it
_STEPS = (
    (("MergeModulelist",), _merge_module_list),
    (("Concatenate",), _concatenate),
    (("Split",), lambda op, state, chain: _split(op, state, chain, chunk=False)),
    (("Chunk",), lambda op, state, chain: _split(op, state, chain, chunk=True)),
    (("Transpose",), _transposed),
    (("Interleave", "PermuteForRope"),
     lambda op, state, chain: _permutations(op, state, chain.sources, chain.targets, chain.config)),
)


def _permutations(op, state: dict, sources: list[str], targets: list[str], config) -> dict:
    """Operations that only reorder one axis: transformers' own code run on one index vector per tensor
    (the probe is long along that axis and 1 wide elsewhere) gives the order."""
    import torch

    dim = getattr(op, "dim", 0)
    probes = {}
    for key, value in state.items():
        sym = _one(value)
        shape = [1] * len(sym.shape)
        shape[dim] = sym.shape[dim]
        probes[key] = torch.arange(sym.shape[dim]).reshape(shape) if len(shape) > 1 else torch.arange(sym.shape[0])
    out = op.convert(probes, source_patterns=sources, target_patterns=targets, config=config)
    if len(out) != len(state):
        raise _CannotFollow(f"{op!r} onto {len(out)} tensors from {len(state)}")
    result = {}
    for (target, order), value in zip(out.items(), state.values()):
        order = (order[0] if isinstance(order, list) else order).reshape(-1).numpy().astype(np.int64)
        result[target] = _permute(_one(value), dim, order)
    return result


def _targets_of(converter, first: str) -> list[str]:
    """The in-memory names a converter makes, without running it (for a refusal that names them)."""
    targets = list(converter.target_patterns)
    return [first.replace(targets[0], t) for t in targets] if targets else [first]


def _covers(t: ModelTensor) -> bool:
    """Each element of the in-memory tensor comes from exactly one stored element: the pieces' sizes add
    up to the tensor's, and no two pieces share an element."""
    sizes = [math.prod(len(a.memory) if isinstance(a, Along) else 1 for a in p.axes) for p in t.pieces]
    if sum(sizes) != math.prod(t.shape):
        return False
    if any(isinstance(a, Along) and len(np.unique(a.memory)) != len(a.memory) for p in t.pieces for a in p.axes):
        return False
    # pieces at different positions of the same stacking axes cannot share an element: compare within each
    groups: dict[tuple, list[Piece]] = {}
    for p in t.pieces:
        groups.setdefault(tuple(a.position if isinstance(a, Fixed) else None for a in p.axes), []).append(p)
    if len({tuple(k is None for k in key) for key in groups}) > 1:
        groups = {(): t.pieces}  # stacked along different axes: compare them all
    for pieces in groups.values():
        for i, p in enumerate(pieces):
            if any(all(_meet(a, b) for a, b in zip(p.axes, q.axes)) for q in pieces[i + 1:]):
                return False
    return True


def _meet(a: Along | Fixed, b: Along | Fixed) -> bool:
    if isinstance(a, Fixed) and isinstance(b, Fixed):
        return a.position == b.position
    if isinstance(a, Fixed) or isinstance(b, Fixed):
        fixed, other = (a, b) if isinstance(a, Fixed) else (b, a)
        return bool(np.isin(fixed.position, other.memory))
    return bool(np.intersect1d(a.memory, b.memory, assume_unique=True).size)
