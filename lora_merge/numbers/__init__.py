"""Quantized bases: which stored tensors make which dense tensor, by the method config.json names.

``find_quantization`` reads ``quantization_config`` and groups the stored tensors (codes and scales)
into ``QuantizedTensor`` views: the dense tensors the model computes with, under the names and shapes
the model gives them, so that placing an adapter and planning the merge see an ordinary model. The
writer and the check decode and encode through these views; nothing else knows the formats. The codecs (and
torch, which they compute with) are imported only for a base that is quantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import QuantizationError
from .quantized import QuantizedTensor

__all__ = ["Quantization", "QuantizedTensor", "find_quantization", "sixteen_bit_original"]

READ = ("fp8", "mxfp4", "bitsandbytes", "compressed-tensors")
ORIGINAL = "merge into the unquantized model it was made from, and quantize the merged model again if you need to"


@dataclass
class Quantization:
    """BASE's quantization: its method and every dense tensor it stores quantized (by dense name)."""

    method: str
    tensors: dict[str, QuantizedTensor]

    def __post_init__(self):
        self.owners = {p.name: t for t in self.tensors.values() for p in t.parts}

    @property
    def requantizable(self) -> bool:
        return all(t.requantizable for t in self.tensors.values())

    @property
    def description(self) -> str:
        return "; ".join(sorted({t.description for t in self.tensors.values()}))

    def owner(self, stored_name: str) -> QuantizedTensor | None:
        """The dense tensor a stored tensor is part of (None: stored as it is)."""
        return self.owners.get(stored_name)

    def view(self, stored: dict) -> dict:
        """The stored tensors with each quantized group replaced by its dense tensor, at its codes' place."""
        seen = {}
        for name, info in stored.items():
            owner = self.owners.get(name)
            if owner is None:
                seen[name] = info
            elif name == owner.parts[0].name:
                seen[owner.name] = owner
        return seen


def quantization_config(config: dict, role: str = "BASE") -> dict | None:
    """config.json's ``quantization_config`` (or its text_config's); one that is not a JSON object is refused."""
    found, where = config.get("quantization_config"), "quantization_config"
    if found is None and isinstance(config.get("text_config"), dict):
        found, where = config["text_config"].get("quantization_config"), "text_config.quantization_config"
    if found is not None and not isinstance(found, dict):
        raise QuantizationError(f"{role}'s config.json: {where} must be a JSON object, found {found!r}", [],
                                "restore the config.json the model was published with")
    return found


# the fields of quantization_config lora-merge reads, by method: what each must be
_FIELDS = {
    "fp8": {"weight_block_size": "null or a list of two positive integers", "scale_fmt": "null or a string",
            "fmt": "null or a string", "activation_scheme": "null or a string",
            "modules_to_not_convert": "null or a list of strings"},
    "mxfp4": {"modules_to_not_convert": "null or a list of strings"},
    "bitsandbytes": {},
    "compressed-tensors": {"format": "null or a string", "ignore": "null or a list of strings"},
}


def _field_ok(key: str, value) -> bool:
    if value is None:
        return True
    if key == "weight_block_size":
        return isinstance(value, list) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    if key in ("modules_to_not_convert", "ignore"):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, str)


def check_fields(method: str, qc: dict, role: str = "BASE") -> None:
    """Every field of ``quantization_config`` that lora-merge reads, checked before anything is planned: one line
    naming the key, the value found and what it must be."""
    for key, must in _FIELDS.get(method, {}).items():
        if not _field_ok(key, qc.get(key)):
            raise QuantizationError(f"{role}'s config.json: quantization_config.{key} must be {must}, found "
                                    f"{qc.get(key)!r}", [], "restore the config.json the model was published with")


def find_quantization(config: dict, stored: dict, role: str = "BASE") -> Quantization | None:
    """BASE's quantization from config.json and the stored tensors (None: not quantized); a method that
    cannot be read, or files that do not hold what the method stores, are refused."""
    qc = quantization_config(config, role)
    if qc is None:
        return None
    named = qc.get("quant_method", "")
    if not isinstance(named, str):
        raise QuantizationError(f"{role}'s config.json: quantization_config.quant_method must be a string, found "
                                f"{named!r}", [], "restore the config.json the model was published with")
    method = named.lower()
    check_fields(method, qc, role)
    if method not in READ:
        detail = f" ({qc['format']})" if isinstance(qc.get("format"), str) else ""
        raise QuantizationError(
            f"{role} is quantized with {method or 'an unnamed method'!r}{detail}, which lora-merge cannot "
            "dequantize or requantize (it reads fp8, mxfp4, bitsandbytes and compressed-tensors FP8 checkpoints)",
            [], ORIGINAL)
    tensors, problems = _GROUPS[method](stored, qc)
    if problems:
        raise QuantizationError(f"{role}'s {method} tensors are not stored as {method} stores them "
                                f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):", problems,
                                "re-download the base model")
    if not tensors:
        raise QuantizationError(
            f"{role}'s config.json names {method} quantization but no tensor is stored that way", [],
            "remove quantization_config from config.json if the weights are not quantized")
    return Quantization(method, tensors)


def _fp8(stored: dict, qc: dict):
    from .fp8.codec import fp8_tensor

    tensors, problems = {}, []
    block = qc.get("weight_block_size")
    power_of_two = qc.get("scale_fmt") == "ue8m0"
    for name, info in stored.items():
        if info.dtype == "F8_E5M2":
            problems.append(f"{name}: float8_e5m2 weights; the fp8 method stores float8_e4m3fn")
        if info.dtype != "F8_E4M3":
            continue
        scale_name = name[: -len("weight")] + "weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"
        scale = stored.get(scale_name)
        if scale is None or scale.dtype not in ("F32", "F8_E8M0"):
            problems.append(f"{name}: no float32 or ue8m0 scale {scale_name}" if scale is None else
                            f"{scale_name}: scales of dtype {scale.dtype}, not float32 or float8_e8m0fnu")
            continue
        made = fp8_tensor(name, info, scale, block, power_of_two or scale.dtype == "F8_E8M0")
        if isinstance(made, str):
            problems.append(made)
        else:
            tensors[name] = made
    return tensors, problems


# compressed-tensors: the formats read, and what each config group's weights must be for them
CT_FORMAT = "float-quantized"
CT_NVFP4 = "nvfp4-pack-quantized"
CT_STRATEGIES = ("channel", "tensor", "block")


def _compressed(stored: dict, qc: dict):
    """compressed-tensors' ``float-quantized`` FP8: ``weight`` as float8_e4m3fn codes, ``weight_scale`` (its dtype)
    per row (``channel``), per tensor or per ``block_structure`` block; value = code × scale. And its NVFP4,
    ``nvfp4-pack-quantized`` (``numbers.nvfp4``). Any other format or scheme (the integer ``pack-quantized``, …) is
    refused by name."""
    block, nvfp4 = _compressed_groups(qc)
    tensors, problems = {}, []
    for name, info in stored.items():
        if nvfp4 and name.endswith(".weight_packed"):
            made = _compressed_nvfp4(name, info, stored)
        elif info.dtype != "F8_E4M3" or (nvfp4 and name.endswith("_scale")):
            continue
        else:
            made = _compressed_fp8(name, info, stored, block)
        if isinstance(made, str):
            problems.append(made)
        else:
            tensors[made.name] = made
    return tensors, problems


def _compressed_nvfp4(name: str, info, stored: dict):
    from .nvfp4.codec import nvfp4_tensor

    dense = name[: -len("_packed")]
    parts = [stored.get(dense + suffix) for suffix in ("_scale", "_global_scale")]
    return nvfp4_tensor(dense, info, *parts) if None not in parts else \
        f"{name}: no {dense}_scale and {dense}_global_scale beside it"


def _compressed_fp8(name: str, info, stored: dict, block):
    from .fp8.codec import fp8_tensor

    scale_name = name + "_scale"
    scale = stored.get(scale_name)
    if scale is None or scale.dtype not in ("F32", "BF16", "F16"):
        return (f"{name}: no float32, bfloat16 or float16 scale {scale_name}" if scale is None else
                f"{scale_name}: scales of dtype {scale.dtype}, not float32, bfloat16 or float16")
    return fp8_tensor(name, info, scale, block, False, "compressed-tensors")


def _compressed_groups(qc: dict) -> tuple[list[int] | None, bool]:
    """The one block size the config's FP8 groups use (None: none by blocks), and whether any group is NVFP4; any
    group lora-merge does not read is refused by name."""
    if qc.get("format") not in (None, CT_FORMAT, CT_NVFP4):
        raise _refused_format(qc["format"])
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups or not all(isinstance(g, dict) for g in groups.values()):
        raise QuantizationError(f"BASE's config.json: quantization_config.config_groups must be a JSON object of "
                                f"groups, found {groups!r}", [], "restore the config.json the model was published with")
    blocks, nvfp4 = set(), False
    for name, group in groups.items():
        form, weights = group.get("format") or qc.get("format"), group.get("weights")
        if form == CT_NVFP4:
            _nvfp4_group(name, weights)
            nvfp4 = True
            continue
        if form != CT_FORMAT:
            raise _refused_format(form, name)
        size = _fp8_group(name, weights)
        if size is not None:
            blocks.add(size)
    if len(blocks) > 1:
        raise QuantizationError(f"BASE's compressed-tensors groups use blocks of several sizes ({sorted(blocks)}); "
                                "lora-merge reads one", [], ORIGINAL)
    return (list(next(iter(blocks))) if blocks else None), nvfp4


def _nvfp4_group(name: str, weights) -> None:
    fits = isinstance(weights, dict) and weights.get("type") == "float" and weights.get("num_bits") == 4 \
        and weights.get("group_size") == 16 and weights.get("strategy") == "tensor_group"
    if not fits:
        raise QuantizationError(
            f"BASE's compressed-tensors config group {name!r} is {CT_NVFP4} with weights {weights!r}; "
            "lora-merge reads NVFP4 as 4-bit float weights in groups of 16 (tensor_group)", [], ORIGINAL)


def _fp8_group(name: str, weights) -> tuple[int, int] | None:
    """An FP8 group's block size (None: by channel or tensor)."""
    fits = isinstance(weights, dict) and weights.get("type") == "float" and weights.get("num_bits") == 8 \
        and weights.get("symmetric", True) is True and weights.get("strategy") in CT_STRATEGIES
    if not fits:
        raise QuantizationError(
            f"BASE's compressed-tensors config group {name!r} quantizes weights as {weights!r}; lora-merge reads "
            "symmetric 8-bit float weights with a channel, tensor or block strategy", [], ORIGINAL)
    if weights["strategy"] != "block":
        return None
    size = weights.get("block_structure")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise QuantizationError(f"BASE's compressed-tensors config group {name!r}: block_structure must be "
                                f"two positive integers, found {size!r}", [],
                                "restore the config.json the model was published with")
    return tuple(size)


def _refused_format(form, group: str | None = None) -> QuantizationError:
    where = f", config group {group!r}" if group else ""
    return QuantizationError(
        f"BASE is quantized with 'compressed-tensors' ({form}{where}), which lora-merge cannot dequantize or "
        f"requantize (of compressed-tensors it reads {CT_FORMAT!r}, FP8 weights with a scale per channel, tensor or "
        f"block, and {CT_NVFP4!r})", [], ORIGINAL)


def _mxfp4(stored: dict, qc: dict):
    from .mxfp4.codec import mxfp4_tensor

    tensors, problems = {}, []
    for name, info in stored.items():
        if not name.endswith("_blocks"):
            continue
        dense = name[: -len("_blocks")]
        scales = stored.get(dense + "_scales")
        made = mxfp4_tensor(dense, info, scales) if scales is not None else f"{name}: no {dense}_scales beside it"
        if isinstance(made, str):
            problems.append(made)
        else:
            tensors[dense] = made
    return tensors, problems


def _bnb(stored: dict, qc: dict):
    from .bnb.codec import bnb_tensors

    return bnb_tensors(stored)


_GROUPS = {"fp8": _fp8, "mxfp4": _mxfp4, "bitsandbytes": _bnb, "compressed-tensors": _compressed}

_FOUR_BIT_SUFFIX = re.compile(r"[-_.](?:unsloth[-_])?(?:bnb[-_])?(?:4bit|nf4|fp4|4-bit)(?:[-_]smashed)?$", re.IGNORECASE)


def sixteen_bit_original(name: str) -> str | None:
    """The repo a 4-bit repo was made from, when its name says so ("org/Model-bnb-4bit" -> "org/Model")."""
    stripped = _FOUR_BIT_SUFFIX.sub("", name.rstrip("/"))
    return stripped if stripped != name.rstrip("/") and stripped else None
