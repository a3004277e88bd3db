"""``--quantize fp8``: which of BASE's float tensors OUT stores as FP8, and the config that says so.

The layout DeepSeek-V3 and Qwen3-FP8 releases use and transformers' FineGrainedFP8 loads: each Linear weight as
float8_e4m3fn with a float32 ``weight_scale_inv`` per 128×128 block, every element the nearest e4m3 value of the
exact W + s·B·A at its block's scale (``numbers.fp8.codec.Fp8Quantized``), rounded once. Embeddings, norms, the output
layer, routers and any matrix whose sides are not multiples of 128 (transformers cannot load partial blocks) stay
in BASE's dtype, and ``modules_to_not_convert`` names each of them. Of the rest, a weight is FP8 where transformers
will find its scale: the weight of a plain ``nn.Linear`` (FineGrainedFP8 swaps no subclass), stored under a name
whose renaming carries the scale along, or cut on loading in whole blocks (the scale is cut the same way).
A dense BASE of a model type whose model class makes each Linear from the tensor of its name (``NAMED_AS_STORED``,
checked against transformers by the tests) is decided by those names alone, without importing transformers; so is
any dense BASE where transformers is not installed, with a note.

Experts are decided a module at a time, as transformers loads them: every module of the model in memory named
``….experts`` becomes one ``FP8Experts`` (gate_up_proj (E, 2I, H) and down_proj (E, H, I) with their block scales)
unless the list names it. So a module's experts are all FP8 or all in BASE's dtype: FP8 where they are stored one
matrix per expert in whole 128×128 blocks (the scales stack as the matrices do), or stacked exactly as in memory
(the scale loads by its name); in BASE's dtype, with the module named, where FP8Experts cannot hold them (biases,
experts stored (E, in, out), blocks cut by the stacking) or where transformers' renaming of the file's tensor would
not carry the scale along. Which modules there are, and how each is made from the files, is transformers' own
model class and conversion tables (``conversion.model_layout``), built on the meta device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .conversion import EXTRA
from .dtypes import FLOAT_DTYPES
from .errors import LayoutError, QuantizationError, name_list
from .numbers.fp8.codec import Fp8Quantized
from .safetensors_file import TensorInfo

if TYPE_CHECKING:
    from collections.abc import Callable

    from .layout import ModelLayout, ModelTensor, Piece
    from .sources import BaseModel

METHODS = ("fp8",)
BLOCK = (128, 128)
KEPT = ("lm_head", "embed_out", "output", "gate", "router", "score", "classifier")  # a module's last name
EXPERT_PARAMETERS = ({"gate_up_proj", "down_proj"}, {"up_proj", "down_proj"})  # what FP8Experts holds
# dense model types whose every Linear is a plain nn.Linear holding the stored tensor of its own name: the names
# decide what transformers would (tests/test_quantize.py holds each against its model class)
NAMED_AS_STORED = ("apertus", "cohere", "gemma", "gemma2", "gemma3_text", "glm4", "gpt_neox", "granite", "lfm2",
                   "llama", "mistral", "olmo2", "phi", "phi3", "qwen2", "qwen3", "seed_oss", "smollm3", "starcoder2")


def module(name: str) -> str:
    return name.removesuffix(".weight")


def scale_name(name: str) -> str:
    """The block scales' name beside ``name``: ``….weight_scale_inv``, or ``…_scale_inv`` for a stacked parameter."""
    return name + "_scale_inv"


def linear(name: str, info) -> bool:
    """A Linear weight OUT can store as FP8: a float matrix in whole blocks, not an embedding, norm or router."""
    if not isinstance(info, TensorInfo) or info.dtype not in FLOAT_DTYPES or len(info.shape) != 2:
        return False
    if not name.endswith(".weight") or any(part in module(name).lower() for part in ("embed", "norm")):
        return False
    return module(name).rsplit(".", 1)[-1] not in KEPT and _whole_blocks(info.shape)


def _whole_blocks(shape: tuple[int, ...]) -> bool:
    return all(n % b == 0 for n, b in zip(shape[-2:], BLOCK))


@dataclass(frozen=True)
class Quantization:
    """What ``--quantize fp8`` does to BASE: which tensors become FP8, and the ``quantization_config`` saying so."""

    method: str
    chosen: frozenset[str] | None = None  # BASE's tensors OUT stores as FP8, as transformers loads them (None: by name)
    expert_tensors: frozenset[str] = frozenset()  # every on-disk tensor of an experts module: decided per module
    kept_modules: tuple[str, ...] = ()  # Linears and experts left in BASE's dtype, as the model in memory names them
    notes: tuple[str, ...] = field(default=(), compare=False)

    def takes(self, name: str, info) -> bool:
        """Whether OUT stores BASE's tensor ``name`` as FP8."""
        return linear(name, info) if self.chosen is None else name in self.chosen

    def quantized(self, name: str, info: TensorInfo) -> Fp8Quantized:
        """The FP8 form of BASE's ``info``: OUT's codes and scales, planned (start -1: not written yet)."""
        *experts, rows, cols = info.shape
        grid = (*experts, math.ceil(rows / BLOCK[0]), math.ceil(cols / BLOCK[1]))
        codes = TensorInfo(name, info.path, "F8_E4M3", info.shape, -1, math.prod(info.shape))
        scales = TensorInfo(scale_name(name), info.path, "F32", grid, -1, 4 * math.prod(grid))
        return Fp8Quantized(name, info.shape, (codes, scales), BLOCK, False, "quantize", source=info)

    def config(self, tensors: dict) -> dict:
        """config.json's ``quantization_config`` for OUT: the modules of every matrix left in BASE's dtype named."""
        kept = {module(n) for n, info in tensors.items() if n not in self.expert_tensors and isinstance(info, TensorInfo)
                and len(info.shape) == 2 and n.endswith(".weight") and not self.takes(n, info)}
        kept = sorted(kept | set(self.kept_modules) | {"lm_head"})  # the files' names (vLLM's) and the model's
        return {"quant_method": self.method, "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": list(BLOCK), "modules_to_not_convert": kept}


def choose(method: str, base: BaseModel, layout: Callable[[], ModelLayout]) -> Quantization:
    """``--quantize method`` for BASE, as transformers will load it: ``layout`` builds the model transformers makes
    of BASE's files. A dense BASE's Linear weights are chosen by their names where its model type is known to store
    them as loaded, or where transformers is not installed; experts need it."""
    experts = _may_have_experts(base)
    if not experts and base.config.get("model_type") in NAMED_AS_STORED:
        return Quantization(method)
    said = f"--quantize {method}: BASE stores experts, and which of them transformers can load as FP8 takes its model class"
    by_name = f"--quantize {method}: Linear weights chosen by their names"
    try:
        import transformers  # noqa: F401  (the layout below is its model class and conversion tables)
    except ImportError:
        if experts:
            raise LayoutError(f"{said}, and transformers is not installed", [],
                              f"install it: {EXTRA}; or merge without --quantize") from None
        return Quantization(method, notes=(f"{by_name} (transformers, not installed, would say which modules it "
                                           "loads as FP8)",))
    try:
        model = layout()
    except LayoutError as e:
        if experts:
            raise LayoutError(f"{said}: {e.args[0]}", e.problems, f"{e.hint}; or merge without --quantize") from None
        return Quantization(method, notes=(f"{by_name}: {e.args[0]}",))
    every, fp8, kept, notes = _experts(method, model, base)
    linears = _linears(model, base, every)
    fp8 |= linears
    kept |= {module(t.name) for t in model.tensors.values() if module(t.name) in model.linears
             and t.name.endswith(".weight") and not all(p.disk in linears for p in t.pieces)}
    return Quantization(method, frozenset(fp8), frozenset(every), tuple(sorted(kept)), notes)


def _may_have_experts(base: BaseModel) -> bool:
    return any(".experts." in n or len(i.shape) == 3 and i.dtype in FLOAT_DTYPES and "conv" not in n
               for n, i in base.tensors.items())


def _linears(model: ModelLayout, base: BaseModel, skip: set[str]) -> set[str]:
    """BASE's Linear weights that transformers loads into FP8Linear modules with their scales: every tensor of the
    model made from one is a plain Linear's weight, taking it whole (renamed with its scale) or in whole blocks."""
    made_from: dict[str, list[tuple[ModelTensor, Piece]]] = {}
    for t in model.tensors.values():
        for piece in t.pieces:
            made_from.setdefault(piece.disk, []).append((t, piece))
    chosen = set()
    for name, info in base.tensors.items():
        uses = made_from.get(name)
        if name in skip or not uses or not linear(name, info):
            continue
        if all(t.why_not is None and t.name.endswith(".weight") and module(t.name) in model.linears and (
                name in model.scales_carried if t.renamed({name: info.shape}) else _whole(piece, info.shape, 0))
               for t, piece in uses):
            chosen.add(name)
    # transformers loads a stored weight cut into several Linears through one converter, which for an FP8 checkpoint
    # it rewrites to dequantize when those Linears are not FP8: from one tensor to several, it cannot
    cut = sorted(n for n, uses in made_from.items() if n not in chosen and n not in skip and n.endswith(".weight")
                 and len({t.name for t, _ in uses}) > 1 and all(module(t.name) in model.linears for t, _ in uses))
    if cut:
        raise QuantizationError(
            f"--quantize fp8: {len(cut)} stored weight{'s' if len(cut) > 1 else ''} that transformers cuts into "
            "several Linears cannot be FP8 (not in whole 128×128 blocks), and transformers cannot load an FP8 "
            "checkpoint that keeps such a weight in BASE's dtype", [name_list(cut)], "merge without --quantize")
    return chosen


def _experts(method: str, model: ModelLayout, base: BaseModel):
    """Every experts module decided whole: (its on-disk tensors, those OUT stores as FP8, the modules kept in BASE's
    dtype, the notes saying why)."""
    every: set[str] = set()
    fp8: set[str] = set()
    kept: list[str] = []
    notes: list[str] = []
    # transformers' FP8 swaps every module of that name for FP8Experts: the others are Linears, or kept
    experts = {n.split(".experts.")[0] + ".experts" for n in model.tensors if ".experts." in n}
    for name in sorted(experts | {m for m in model.module_parameters if m.endswith(".experts")}):
        members = {n: t for n, t in model.tensors.items() if n.startswith(name + ".")}
        every |= {piece.disk for t in members.values() for piece in t.pieces}
        params = model.module_parameters.get(name, [])
        why = _why_not_fp8(name, params, [members.get(f"{name}.{p}") for p in params], model, base) \
            if len(members) == len(params) else f"{_kind(name)}: one module per expert (FP8Experts holds them stacked)"
        if why is None:
            fp8 |= {piece.disk for t in members.values() for piece in t.pieces}
        else:
            kept.append(name)
            notes.append(why)
    if kept:
        notes.insert(0, f"--quantize {method}: {len(kept)} experts module{'s' if len(kept) > 1 else ''} left in "
                        f"BASE's dtype and named in modules_to_not_convert")
    return every, fp8, set(kept), tuple(dict.fromkeys(notes))


def _why_not_fp8(name: str, params: list[str], made: list[ModelTensor | None], model: ModelLayout,
                 base: BaseModel) -> str | None:
    """Why transformers could not load this experts module as FP8Experts from what OUT would store (None: it can)."""
    kind = _kind(name)
    if set(params) not in EXPERT_PARAMETERS:
        extra = sorted(set(params) - {"gate_up_proj", "up_proj", "down_proj"})
        return f"{kind}: {', '.join(extra) or 'its parameters'} (FP8Experts holds none)"
    form = model.experts_forms.get(name, "not a module of the model")
    if form:
        return f"{kind}: {form}"
    for param, t in zip(params, made):
        if t is None or t.why_not or len(t.shape) != 3:
            return f"{kind}.{param}: not made from the files in a way lora-merge follows"
        rows = t.shape[1] // 2 if param == "gate_up_proj" else t.shape[1]
        if rows % BLOCK[0] or t.shape[2] % BLOCK[1] or (param == "gate_up_proj" and t.shape[1] % 2):
            what = f"gate and up of {rows}×{t.shape[2]} each" if param == "gate_up_proj" else \
                f"{rows}×{t.shape[2]} per expert"
            return f"{kind}.{param}: {what}, not whole 128×128 blocks"
        infos = [base.tensors.get(p.disk) for p in t.pieces]
        if any(not isinstance(i, TensorInfo) or i.dtype not in FLOAT_DTYPES for i in infos):
            return f"{kind}.{param}: not stored in a float dtype"
        stored = t.renamed({p.disk: i.shape for p, i in zip(t.pieces, infos)})
        if stored in model.scales_carried:
            continue  # stacked in the files as in memory: the scale beside it goes where the tensor goes
        if stored is not None:
            return f"{kind}.{param}: stored as {module(stored).rsplit('.', 1)[-1]}, and transformers' renaming leaves " \
                "its scale"
        if not all(len(i.shape) == 2 and p.disk.endswith(".weight") and _whole(p, i.shape, 1)
                   for p, i in zip(t.pieces, infos)):
            return (f"{kind}.{param}: its stored tensors do not stack into it in whole blocks under their own "
                    "names, so transformers would not load their scales")
    return None


def _kind(name: str) -> str:
    """``mlp.experts`` for ``model.layers.3.mlp.experts``: the module's kind, for the notes."""
    return ".".join(name.split(".")[-2:])


def _whole(piece: Piece, shape: tuple[int, ...], experts: int) -> bool:
    """A stored matrix of ``shape`` goes into the model's tensor unturned, in whole 128×128 blocks on both sides
    (after ``experts`` leading axes it is one position of): its scales go along as transformers moves them."""
    from .layout import Along, Fixed

    if len(piece.axes) != experts + 2 or not all(isinstance(a, Fixed) for a in piece.axes[:experts]):
        return False
    for axis, (along, size, block) in enumerate(zip(piece.axes[experts:], shape, BLOCK)):
        if not isinstance(along, Along) or along.axis != axis or len(along.memory) % block:
            return False
        for index in (along.memory, along.disk):
            first = int(index[0])
            if first % block or not np.array_equal(index, np.arange(first, first + len(index))):
                return False
    return True
