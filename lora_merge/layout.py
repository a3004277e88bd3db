"""Where each tensor of the model in memory lives on disk, and adapters moved from the one to the other.

peft names an adapter's targets after the model transformers builds in memory; lora-merge reads and
writes the files on disk. Mostly the two agree name for name (``FilesLayout``: nothing is imported).
Where they do not (experts fused in memory and stored one per expert, renamed prefixes, halves
interleaved), a ``ModelLayout`` says for every in-memory tensor which elements of which on-disk
tensors it is made of, one index vector per axis, never the tensors themselves. ``to_disk`` then
turns each target of an adapter into targets on on-disk tensors: "these rows of that tensor get
these rows of the delta", as factors sliced to fit, so that the merge, its single rounding and its
memory bound stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from .adapter import (
    AddScaled,
    DerivedTensor,
    LoadCache,
    LowRank,
    SharedTensor,
    TargetOps,
)
from .errors import PlanError, name_list

if TYPE_CHECKING:
    from .adapter import Adapter
    from .sources import BaseModel


@dataclass(frozen=True)
class Along:
    """An axis of the in-memory tensor that runs along ``axis`` of the on-disk tensor: position
    ``memory[i]`` of the one is coordinate ``disk[i]`` of the other."""

    axis: int
    memory: np.ndarray
    disk: np.ndarray


@dataclass(frozen=True)
class Fixed:
    """An axis of the in-memory tensor that the on-disk tensor does not have (experts stacked from one
    tensor each): the on-disk tensor sits at ``position`` along it."""

    position: int


@dataclass(frozen=True)
class Piece:
    """One on-disk tensor's share of an in-memory tensor: one entry per axis of the in-memory tensor."""

    disk: str
    axes: tuple[Along | Fixed, ...]


@dataclass
class ModelTensor:
    """An in-memory tensor: its shape and the on-disk pieces it is made of (``why_not``: it is made
    in a way lora-merge cannot follow, and why)."""

    name: str
    shape: tuple[int, ...]
    pieces: list[Piece]
    why_not: str | None = None

    def renamed(self, disk_shapes: dict[str, tuple[int, ...]]) -> str | None:
        """The on-disk name when this tensor is one on-disk tensor exactly as it is stored."""
        if len(self.pieces) != 1:
            return None
        piece = self.pieces[0]
        if disk_shapes.get(piece.disk) != self.shape:
            return None
        for i, axis in enumerate(piece.axes):
            if not (isinstance(axis, Along) and axis.axis == i and _identity(axis.memory) and _identity(axis.disk)):
                return None
        return piece.disk


def _identity(index: np.ndarray) -> bool:
    return bool(np.array_equal(index, np.arange(len(index))))


class FilesLayout:
    """The model in memory is taken to be the files: names and shapes as stored."""

    description = "the files"

    def __init__(self, base: BaseModel):
        self.shapes = {n: i.shape for n, i in base.tensors.items()}

    def parameters(self, module: str) -> tuple[list[str], bool]:
        """The parameters of ``module`` (names without the module), and whether in the model's own order:
        the files do not record it."""
        prefix = module + "."
        return [n[len(prefix):] for n in self.shapes if n.startswith(prefix) and "." not in n[len(prefix):]], False

    def experts_transposed(self, module: str) -> bool | None:
        """Whether ``module``'s stacked expert parameters are stored (E, in, out): not known from the files."""
        return None


@dataclass
class ModelLayout:
    """The model transformers builds from the files: every in-memory tensor and the pieces it is made of."""

    description: str  # e.g. "transformers 5.23.0 (qwen3_moe)"
    tensors: dict[str, ModelTensor]
    shapes: dict[str, tuple[int, ...]]  # every in-memory parameter, made from the files or not
    module_parameters: dict[str, list[str]] = field(default_factory=dict)  # in registration order
    transposed_experts: dict[str, bool] = field(default_factory=dict)
    linears: frozenset[str] = frozenset()  # modules that are Linears as transformers' quantizers take them
    scales_carried: frozenset[str] = frozenset()  # on-disk tensors whose ``…_scale_inv`` is renamed along with them
    experts_forms: dict[str, str] = field(default_factory=dict)  # ``….experts`` modules: how FP8Experts differs

    def parameters(self, module: str) -> tuple[list[str], bool]:
        return self.module_parameters.get(module, []), True

    def experts_transposed(self, module: str) -> bool | None:
        return self.transposed_experts.get(module, False)


# ---------------------------------------------------------------------------------- adapters to disk


def to_disk(adapter: Adapter, layout: ModelLayout, disk_shapes: dict[str, tuple[int, ...]]) -> Adapter:
    """The adapter with its targets moved from in-memory tensors onto the on-disk tensors they are made of.

    Every element of every delta lands on exactly one on-disk element, or the adapter is refused; a
    target that names no in-memory tensor is left for the planner to report.
    """
    targets: dict[str, TargetOps] = {}
    mapped: dict[str, list[str]] = {}
    problems: list[str] = []
    cache = LoadCache()

    def add(op: TargetOps) -> None:
        held = targets.get(op.name)
        if held is None:
            targets[op.name] = op
        elif _only_deltas(held) and _only_deltas(op):  # a tensor fused on disk, split in memory
            targets[op.name] = replace(held, deltas=held.deltas + op.deltas)
        else:
            problems.append(f"{op.name}: reached from both {held.module} and {op.module}")

    for name, op in adapter.targets.items():
        tensor = layout.tensors.get(name)
        if tensor is None:
            add(op)
            mapped[name] = [name]
            continue
        if tensor.why_not:
            problems.append(f"{name}: {tensor.why_not}")
            continue
        disk = tensor.renamed(disk_shapes)
        if disk is not None:
            add(replace(op, name=disk))
            mapped[name] = [disk]
            continue
        pieces, found = _split(op, tensor, disk_shapes, cache)
        problems += found
        for piece in pieces:
            add(piece)
        mapped[name] = [p.name for p in pieces]
    if problems:
        raise PlanError(f"the adapter cannot be placed on BASE's files ({len(problems)} problem"
                        f"{'s' if len(problems) > 1 else ''}):", problems,
                        f"lora-merge follows {layout.description} from the model in memory to the files")
    return replace(adapter, targets=targets, mapped=mapped, layout=layout.description)


def _only_deltas(op: TargetOps) -> bool:
    return op.replace is None and op.dora_magnitude is None and op.row_indices is None


def _split(op: TargetOps, tensor: ModelTensor, disk_shapes, cache: LoadCache) -> tuple[list[TargetOps], list[str]]:
    """The target's deltas as targets on each on-disk piece of the in-memory tensor."""
    name = tensor.name
    kinds = [d.name for d in op.deltas if not isinstance(d, (LowRank, AddScaled))]
    if op.multiply is not None or kinds:
        what = op.multiply.name if op.multiply is not None else kinds[0]
        return [], [f"{name}: {what} cannot be split across the on-disk tensors "
                    f"{name_list([p.disk for p in tensor.pieces])} yet"]
    if not _only_deltas(op):
        what = "a full replacement" if op.replace is not None else "DoRA" if op.dora_magnitude is not None \
            else "trainable tokens"
        return [], [(f"{name}: {what} cannot be split across the on-disk tensors "
                     f"{name_list([p.disk for p in tensor.pieces])}")]
    fitted: list[LowRank | AddScaled] = []
    for d in op.deltas:
        if isinstance(d, AddScaled):
            fitted.append(d)
            continue
        d = d.fit(tensor.shape, op.fan_in_fan_out)
        if isinstance(d, str):
            return [], [f"{name}: {d}"]
        fitted.append(d)
    out: list[TargetOps] = []
    problems: list[str] = []
    for piece in tensor.pieces:
        shape = disk_shapes[piece.disk]
        along = [a.axis for a in piece.axes if isinstance(a, Along)]
        if sorted(along) != list(range(len(shape))):
            problems.append(f"{name}: its piece {piece.disk} {list(shape)} does not cover every axis once")
            continue
        deltas = []
        for d in fitted:
            placed = _piece_bias(d, piece, shape) if isinstance(d, AddScaled) else _piece_low_rank(d, piece, shape, cache)
            if isinstance(placed, str):
                problems.append(f"{name} -> {piece.disk}: {placed}")
            else:
                deltas.append(placed)
        out.append(TargetOps(name=piece.disk, module=op.module, deltas=deltas, embedding=op.embedding))
    return out, problems


def _source_index(axis: Along, shape: tuple[int, ...]):
    """For each coordinate of the on-disk axis, the in-memory position it holds (-1: not from this tensor)."""
    import torch

    index = torch.full((shape[axis.axis],), -1, dtype=torch.int64)
    index[torch.from_numpy(axis.disk)] = torch.from_numpy(axis.memory)
    return index


def _take(t, dim: int, index):
    """``t`` indexed along ``dim`` by ``index``, with zeros where the index is -1."""
    import torch

    if len(index) == t.shape[dim] and torch.equal(index, torch.arange(len(index))):
        return t
    keep = index >= 0
    if bool(keep.all()):
        return t.index_select(dim, index)
    shape = list(t.shape)
    shape[dim] = len(index)
    return t.new_zeros(shape).index_copy_(dim, keep.nonzero().reshape(-1), t.index_select(dim, index[keep]))


def _piece_low_rank(d: LowRank, piece: Piece, shape: tuple[int, ...], cache: LoadCache) -> LowRank | str:
    """``d`` (on the in-memory tensor, orientation decided) as a delta on one on-disk piece: its factors
    sliced, reordered and zero-padded so that ``s·B'·A'`` is exactly that piece of the delta."""
    if d.experts:
        expert_axis, (out_axis, in_axis) = 0, ((2, 1) if d.transposed else (1, 2))
    else:
        if len(piece.axes) != 2:
            return "a convolution kernel cannot be split across tensors"
        expert_axis, (out_axis, in_axis) = None, ((1, 0) if d.transposed else (0, 1))
    out, inn = piece.axes[out_axis], piece.axes[in_axis]
    if not (isinstance(out, Along) and isinstance(inn, Along)):
        return "the on-disk tensor does not keep both matrix axes"
    rows, cols = _source_index(out, shape), _source_index(inn, shape)
    r, n = d.rank, max(d.experts, 1)
    turned = out.axis > inn.axis  # the on-disk tensor holds the piece as (in × out)
    stacked = piece.axes[expert_axis] if expert_axis is not None else None
    if not isinstance(stacked, Along):  # a plain matrix, or one expert of a stacked parameter
        e = stacked.position if isinstance(stacked, Fixed) else 0
        a = DerivedTensor(d.a, (r, len(cols)), lambda t: _take(t, 1, cols), rows=(e * r, (e + 1) * r))
        b_all = SharedTensor(d.b, cache)
        b = DerivedTensor(b_all, (len(rows), r),
                          lambda t: _take(t.reshape(t.shape[0], r, n)[:, :, e], 0, rows))
        return LowRank(a, b, d.scale, transposed=turned)
    if stacked.axis != 0 or len(shape) != 3:
        return "stacked experts must stay the first axis of a 3-D tensor on disk"
    experts = _source_index(stacked, shape)
    if bool((experts < 0).any()):
        return "the on-disk tensor stacks experts from elsewhere too"
    k = len(experts)
    a = DerivedTensor(SharedTensor(d.a, cache), (k * r, len(cols)),
                      lambda t: _take(t.reshape(n, r, -1).index_select(0, experts), 2, cols).reshape(k * r, -1))
    b = DerivedTensor(SharedTensor(d.b, cache), (len(rows), r * k),
                      lambda t: _take(t.reshape(t.shape[0], r, n).index_select(2, experts), 0, rows).reshape(len(rows), -1))
    return LowRank(a, b, d.scale, transposed=turned, experts=k)


def _piece_bias(d: AddScaled, piece: Piece, shape: tuple[int, ...]) -> AddScaled | str:
    (axis,) = piece.axes if len(piece.axes) == 1 else (None,)
    if not isinstance(axis, Along):
        return "LoRA's bias can only be split along its one axis"
    index = _source_index(axis, shape)
    return AddScaled(DerivedTensor(d.t, (len(index),), lambda t: _take(t, 0, index)), d.scale)
