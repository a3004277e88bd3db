"""The one canonical description of an adapter: what happens to which base tensor.

Every format is translated into these objects at the edge; the planner, the math and the writer see
nothing else. Orientation is always stated against the *logical* matrix (out × in): a low-rank
delta is ``scale · B @ A`` with A (r × in) and B (out × r), and ``transposed`` says the stored
tensor is (in × out), as for GPT-2's Conv1D and for embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from .dtypes import from_torch, torch_dtype
from .reader import read_rows
from .safetensors_file import TensorInfo


class FileTensor:
    """A tensor in a safetensors file, read on demand (whole or by rows of its first dimension)."""

    def __init__(self, info: TensorInfo):
        self.info = info

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def dtype(self) -> str:
        return self.info.dtype

    def rows(self, start: int, stop: int):
        import torch

        info = self.info
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        if info.nbytes == 0 or (shape and shape[0] == 0):
            return torch.empty(shape, dtype=torch_dtype(info.dtype))
        raw = read_rows(info, start, stop)
        return torch.frombuffer(bytearray(raw), dtype=torch_dtype(info.dtype)).reshape(shape)

    def load(self):
        return self.rows(0, self.shape[0] if self.shape else 1)

    @property
    def stored(self) -> FileTensor:
        return self


class MemoryTensor:
    """A tensor already in memory (from a ``torch.load(weights_only=True)`` adapter file)."""

    def __init__(self, name: str, tensor):
        self.name = name
        self.tensor = tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> str:
        return from_torch(self.tensor.dtype)

    def rows(self, start: int, stop: int):
        return self.tensor[start:stop]

    def load(self):
        return self.tensor

    @property
    def stored(self) -> MemoryTensor:
        return self


class DerivedTensor:
    """A stored adapter tensor presented in the canonical layout (transposed, reshaped, padded, sliced),
    computed when loaded. It keeps the stored tensor's name: coverage counts stored tensors.

    ``rows`` reads only that range of the stored tensor's first dimension (one expert's factor of a
    fused parameter) instead of all of it.
    """

    def __init__(self, source, shape: tuple[int, ...], make, rows: tuple[int, int] | None = None):
        self.source = source
        self.shape = tuple(shape)
        self._make = make
        self._rows = rows

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def dtype(self) -> str:
        return self.source.dtype

    @property
    def stored(self):
        """The tensor as stored in the adapter's file."""
        return self.source.stored

    def rows(self, start: int, stop: int):
        return self.load()[start:stop]

    def load(self):
        raw = self.source.rows(*self._rows) if self._rows is not None else self.source.load()
        t = self._make(raw)
        if tuple(t.shape) != self.shape:  # a layout rule and its declared shape disagree: never merge a guess
            raise AssertionError(f"{self.name}: derived shape {tuple(t.shape)}, declared {self.shape}")
        return t


def transposed(t) -> DerivedTensor:
    """The matrix transpose of a stored 2-D tensor."""
    return DerivedTensor(t, tuple(reversed(t.shape)), lambda x: x.T)


class SharedTensor:
    """A stored tensor that several derived tensors slice (one fused factor, many on-disk experts): it is
    read once and kept in a small cache shared by an adapter's tensors, not read again for each slice."""

    def __init__(self, source, cache: LoadCache):
        self.source = source
        self.cache = cache

    name = property(lambda self: self.source.name)
    shape = property(lambda self: self.source.shape)
    dtype = property(lambda self: self.source.dtype)
    stored = property(lambda self: self.source.stored)

    def rows(self, start: int, stop: int):
        return self.source.rows(start, stop)

    def load(self):
        return self.cache.get(self.source)


class LoadCache:
    """The last few stored tensors loaded, by identity: bounded, so memory stays flat however many share them."""

    def __init__(self, size: int = 4):
        self.size = size
        self.items: dict[int, tuple[object, object]] = {}

    def get(self, source):
        key = id(source)
        if key in self.items:
            self.items[key] = self.items.pop(key)  # most recent last
        else:
            if len(self.items) >= self.size:
                del self.items[next(iter(self.items))]
            self.items[key] = (source, source.load())
        return self.items[key][1]


AdapterTensor = FileTensor | MemoryTensor | DerivedTensor | SharedTensor


@dataclass(frozen=True)
class LowRank:
    """``W += scale · B @ A`` in the logical orientation.

    ``a`` is (r·E × in…) and ``b`` (out × r·E…); for ``experts`` > 0 the target is a stacked
    (E, d1, d2) parameter and the factors are split per expert as peft's ParamWrapper does.
    ``transposed``: True, the stored tensor is (in × out) (or (E, in, out)); False, it is (out × in);
    None, not known yet: ``fit`` decides from the stored tensor's shape.
    """

    a: AdapterTensor
    b: AdapterTensor
    scale: float
    transposed: bool | None = None
    experts: int = 0  # 0: a plain matrix (or conv kernel); E: a stacked (E, ·, ·) parameter
    kind: str = "lora"  # the adapter kind it comes from, for the report ("adalora": one rank component)

    @property
    def rank(self) -> int:
        return self.a.shape[0] // max(self.experts, 1)

    def fit(self, shape: tuple[int, ...], fan_in_fan_out: bool = False) -> LowRank | str:
        """This delta with its orientation decided for a stored tensor of ``shape``, or what does not fit.

        A square matrix fits both ways: ``fan_in_fan_out`` (a Conv1D layer) says it is stored in × out.
        """
        a_shape, b_shape, w_shape = self.a.shape, self.b.shape, tuple(shape)
        if self.experts:
            e = self.experts
            out, inn = b_shape[0], a_shape[-1]
            if len(w_shape) != 3 or w_shape[0] != e or len(a_shape) != 2 or len(b_shape) != 2:
                return f"experts LoRA A{list(a_shape)} B{list(b_shape)} does not fit a stacked parameter {list(w_shape)}"
            straight, turned = w_shape[1:] == (out, inn), w_shape[1:] == (inn, out)
            if self.transposed is not None:
                if (turned if self.transposed else straight):
                    return self
                want = (e, inn, out) if self.transposed else (e, out, inn)
                return f"experts LoRA gives {list(want)} but the base has {list(w_shape)}"
            if straight and turned:
                return (f"experts LoRA fits the square stacked parameter {list(w_shape)} both ways round, "
                        "and only the model class knows which")
            if not (straight or turned):
                return f"experts LoRA gives ({e}, {out}, {inn}) but the base has {list(w_shape)}"
            return replace(self, transposed=turned)
        if len(a_shape) < 2 or len(b_shape) < 2 or a_shape[0] != b_shape[1]:
            return f"lora_A{list(a_shape)} and lora_B{list(b_shape)} do not compose"
        out = b_shape[0]
        if len(w_shape) > 2:  # convolution: A (r, in, k…), B (out, r, 1…)
            if w_shape[0] != out or w_shape[1:] != tuple(a_shape[1:]) or any(x != 1 for x in b_shape[2:]):
                return f"conv LoRA A{list(a_shape)} B{list(b_shape)} does not fit a kernel {list(w_shape)}"
            return replace(self, transposed=False)
        inn = math.prod(a_shape[1:])
        straight, turned = w_shape == (out, inn), w_shape == (inn, out)
        if self.transposed is not None:
            straight, turned = straight and not self.transposed, turned and self.transposed
        if straight and turned:  # square: only the layer type tells, as in peft
            return replace(self, transposed=fan_in_fan_out)
        if straight or turned:
            return replace(self, transposed=turned)
        want = (inn, out) if self.transposed else (out, inn)
        return f"LoRA gives shape {list(want)} but the base tensor is {list(w_shape)}"


@dataclass
class AddScaled:
    """``W += scale · T`` for a tensor of W's shape (LoRA's own bias)."""

    t: AdapterTensor
    scale: float


@dataclass
class TargetOps:
    """Everything the adapter does to one base tensor, applied in this order:
    replace the starting value, multiply (IA3), add every delta, rescale (DoRA), overwrite rows.

    A delta is a ``LowRank`` product, an ``AddScaled`` bias, or another additive kind of ``kinds.py``."""

    name: str  # the base tensor's name
    module: str  # the adapter module that produced it, for messages
    replace: AdapterTensor | None = None
    deltas: list = field(default_factory=list)
    multiply: object = None  # IA3, OFT, BOFT, HRA or RoAd: a transform of ``transforms.py``
    dora_magnitude: AdapterTensor | None = None
    dora_transposed: bool = False
    row_indices: list[int] | None = None
    rows: AdapterTensor | None = None
    # hints for the planner
    embedding: bool = False
    fan_in_fan_out: bool = False  # the adapter's hint for square Conv1D weights
    may_resize: bool = False  # a full replacement whose first dimension may differ (resized vocabulary)
    optional: bool = False  # left out where BASE has no such tensor (IA3's bias scaling, as peft does)

    def tensors(self):
        """Every adapter tensor this target reads."""
        yield from (t for t in (self.replace, self.dora_magnitude, self.rows) if t is not None)
        if self.multiply is not None:
            yield from self.multiply.tensors()
        for d in self.deltas:
            yield from (d.a, d.b) if isinstance(d, LowRank) else (d.t,) if isinstance(d, AddScaled) else d.tensors()

    @property
    def kind(self) -> str:
        parts = []
        if self.replace is not None:
            parts.append("replace")
        if self.multiply is not None:
            parts.append(self.multiply.describe())
        for d in self.deltas:
            if isinstance(d, LowRank):
                what = d.kind if d.kind != "lora" else \
                    "lora-embedding" if self.embedding else ("lora-experts" if d.experts else "lora")
                parts.append(f"{what}(r={d.rank}, s={d.scale:g}{', T' if d.transposed else ''})")
            elif isinstance(d, AddScaled):
                parts.append(f"bias(s={d.scale:g})")
            else:
                parts.append(d.describe())
        if self.dora_magnitude is not None:
            parts.append("dora")
        if self.row_indices is not None:
            parts.append(f"rows[{len(self.row_indices)}]")
        return " + ".join(parts)


KIND_NAMES = {"LORA": "LoRA", "ADALORA": "AdaLoRA", "LOHA": "LoHa", "LOKR": "LoKr", "IA3": "IA3", "VERA": "VeRA", "MISS": "MiSS", "OFT": "OFT", "HRA": "HRA", "FOURIERFT": "FourierFT", "BOFT": "BOFT", "ROAD": "RoAd"}


@dataclass
class Adapter:
    """A translated adapter: one ``TargetOps`` per base tensor it changes."""

    path: Path  # the adapter's folder, or its single file
    format: str
    config: dict
    targets: dict[str, TargetOps]
    tensor_names: list[str]  # every tensor in the adapter's file
    files: list[Path] = field(default_factory=list)  # what it was read from (weights and config), for hashes
    notes: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)  # tensors knowingly not merged, with the reason
    weight: float = 1.0  # the factor its deltas were added with (several adapters, or -1 to unmerge)
    parts: list[Adapter] = field(default_factory=list)  # several adapters summed: each as loaded
    source: object = None  # the Source the user named (set once resolved)
    read_at_load: set[str] = field(default_factory=set)  # tensors folded into the scales (kohya's alpha)
    # where each target went when they were placed through the model's layout: in-memory name -> on-disk tensors
    mapped: dict[str, list[str]] = field(default_factory=dict)
    layout: str | None = None  # what told where they are (transformers' conversion for the model type)

    @property
    def kind(self) -> str:
        """The adapter kind, as peft names it (LoRA for every other format)."""
        peft_type = str(self.config.get("peft_type", "LORA")).upper() if self.format == "peft" else "LORA"
        return KIND_NAMES.get(peft_type, peft_type)

    @property
    def folder(self) -> Path:
        """Where files beside the adapter (a tokenizer) would be."""
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def tensor_count(self) -> int:
        return len(self.tensor_names)

    def used_tensor_names(self) -> set[str]:
        """Names of the adapter tensors that some target consumes."""
        return {t.name for op in self.targets.values() for t in op.tensors()} | self.read_at_load

    @property
    def placed_through_layout(self) -> int:
        """Targets that name an in-memory tensor stored under another name or layout."""
        return sum(1 for name, disk in self.mapped.items() if disk != [name])

    @property
    def members(self) -> list[Adapter]:
        """The adapters as the user named them: this one, or each of the ones it sums."""
        return self.parts or [self]


def combine(adapters: list[Adapter]) -> Adapter:
    """Several adapters (each with its ``weight``) as one: per base tensor, every delta of every
    adapter, scaled by its adapter's weight, summed in one pass.

    What cannot be summed is refused: a tensor that two adapters replace (or one replaces and another
    changes), and DoRA, whose rescaling depends on the whole sum. A kind that multiplies W (IA3, OFT, HRA) applies
    first, so it must come before every adapter that changes the same tensor, at weight 1, and alone of its sort:
    the result is f(W) plus the other adapters' deltas, the order the adapters were given in. IA3 alone at weight
    -1 (unmerge) divides by l instead.
    """
    from .errors import PlanError

    if len(adapters) == 1 and adapters[0].weight == 1.0:
        return adapters[0]
    targets: dict[str, TargetOps] = {}
    problems: list[str] = []
    owners: dict[str, list[str]] = {}
    for i, adapter in enumerate(adapters):
        label = f"adapter {i + 1} ({adapter.path.name})"
        for name, op in adapter.targets.items():
            owners.setdefault(name, []).append(label)
            if op.dora_magnitude is not None and (len(adapters) > 1 or adapter.weight != 1.0):
                problems.append(f"{name}: {label} is DoRA, whose rescaling cannot be weighted or undone from "
                                "the adapter alone")
            undo = op.multiply is not None and op.multiply.name == "ia3" and adapter.weight == -1.0
            if undo and len(adapters) > 1:
                problems.append(f"{name}: {label} is IA3 at weight -1 (divided back out) beside other adapters; "
                                "take it out alone, in a run of its own")
            elif op.multiply is not None and not undo and (adapter.weight != 1.0 or name in targets):
                why = f"weighted {adapter.weight:g}" if adapter.weight != 1.0 else \
                    f"after {', '.join(owners[name][:-1])}, which change it first"
                problems.append(f"{name}: {label} multiplies the tensor ({op.multiply.name}) {why}; a multiplying "
                                "adapter applies first, at weight 1: list it before the others, or merge in two runs")
            if (op.replace is not None or op.row_indices is not None) and adapter.weight != 1.0:
                problems.append(f"{name}: {label} replaces the tensor (or some rows), which cannot be weighted "
                                "or undone from the adapter alone")
            merged = targets.get(name)
            if merged is None:
                merged = targets[name] = TargetOps(
                    name=name, module=op.module, replace=op.replace,
                    multiply=replace(op.multiply, inverse=True) if undo else op.multiply,
                    dora_magnitude=op.dora_magnitude,
                    dora_transposed=op.dora_transposed, row_indices=op.row_indices, rows=op.rows,
                    embedding=op.embedding, fan_in_fan_out=op.fan_in_fan_out, may_resize=op.may_resize)
            elif op.replace is not None or op.row_indices is not None or merged.replace is not None \
                    or merged.row_indices is not None:
                problems.append(f"{name}: replaced by one adapter and changed by another ({', '.join(owners[name])})")
            for d in op.deltas:
                merged.deltas.append(replace(d, scale=d.scale * adapter.weight) if adapter.weight != 1.0 else d)
    if problems:
        raise PlanError("these adapters cannot be combined:", problems)
    notes = [n for a in adapters for n in a.notes]
    for i, adapter in enumerate(adapters):
        multiplied = [op for op in adapter.targets.values() if op.multiply is not None]
        if multiplied and len(adapters) > 1:
            notes.append(f"adapter {i + 1} ({adapter.kind}) multiplies {len(multiplied)} tensors first; the other "
                         "adapters' deltas are added to the result, in the order given")
    first = adapters[0]
    return Adapter(
        first.path, "+".join(dict.fromkeys(a.format for a in adapters)), first.config, targets,
        [n for a in adapters for n in a.tensor_names],
        files=[f for a in adapters for f in a.files], notes=notes,
        ignored={k: v for a in adapters for k, v in a.ignored.items()}, parts=list(adapters),
        read_at_load=set().union(*(a.read_at_load for a in adapters)),
    )
