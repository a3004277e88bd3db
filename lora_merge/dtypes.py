"""Every fact lora-merge knows about a tensor dtype, in one table: safetensors' name, torch's name, size,
and for floating-point dtypes the bits that set their rounding (mantissa, smallest and largest exponent)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    name: str  # safetensors' name, e.g. "BF16"
    torch: str | None  # torch's name, e.g. "bfloat16" (None: torch has no such dtype)
    size: int  # bytes per element
    mantissa: int = 0  # explicit mantissa bits; 0 for integers
    min_exponent: int = 0  # of the smallest normal number
    max_exponent: int = 0  # of the largest finite number
    computed: bool = False  # a float the merge computes on and writes (F8 and the like are codecs' business)

    @property
    def config_name(self) -> str | None:
        """How config.json's ``torch_dtype`` names it ("bfloat16")."""
        return self.torch if self.computed else None


DTYPES = {d.name: d for d in [
    DType("F64", "float64", 8, 52, -1022, 1023, True),
    DType("F32", "float32", 4, 23, -126, 127, True),
    DType("F16", "float16", 2, 10, -14, 15, True),
    DType("BF16", "bfloat16", 2, 7, -126, 127, True),
    DType("F8_E4M3", "float8_e4m3fn", 1, 3, -6, 8),
    DType("F8_E5M2", "float8_e5m2", 1, 2, -14, 15),
    DType("F8_E8M0", "float8_e8m0fnu", 1),
    DType("I64", "int64", 8), DType("I32", "int32", 4), DType("I16", "int16", 2), DType("I8", "int8", 1),
    DType("U64", "uint64", 8), DType("U32", "uint32", 4), DType("U16", "uint16", 2), DType("U8", "uint8", 1),
    DType("BOOL", "bool", 1),
]}
FLOAT_DTYPES = {n for n, d in DTYPES.items() if d.computed}  # what a LoRA delta can be added to
OUTPUT_DTYPES = {d.config_name: d.name for d in DTYPES.values() if d.computed and d.name != "F64"}  # --dtype
SHORT_NAMES = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "fp32": "float32", "f32": "float32"}


def output_dtype(text: str) -> str:
    """--dtype's value as config.json names it, from that name or a short one people type (bf16, fp16, fp32)."""
    name = SHORT_NAMES.get(text.lower(), text.lower()) if isinstance(text, str) else text
    if name not in OUTPUT_DTYPES:
        raise ValueError(f"dtype {text!r} is not one of {', '.join(OUTPUT_DTYPES)} (or {', '.join(SHORT_NAMES)})")
    return name


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype name."""
    import torch

    d = DTYPES.get(name)
    found = getattr(torch, d.torch, None) if d is not None and d.torch else None
    if found is None:
        raise ValueError(f"tensors of dtype {name} cannot be computed on")
    return found


def from_torch(dtype) -> str:
    """The safetensors name of a torch dtype."""
    torch_name = str(dtype).removeprefix("torch.")
    for d in DTYPES.values():
        if d.torch == torch_name:
            return d.name
    raise ValueError(f"dtype {dtype} has no safetensors name")
