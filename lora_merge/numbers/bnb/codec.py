"""bitsandbytes checkpoints (``quant_method: bitsandbytes``), read only: they are merged into a dequantized
checkpoint, since requantizing NF4 would change the weights more than the adapter does.

4-bit (NF4 or FP4): ``<m>.weight`` packs two 4-bit codes per byte (the first element in the high
nibble) over the flattened matrix, in blocks of ``blocksize`` elements that share an ``absmax``; the
value is ``quant_map[code] × absmax``. With nested quantization the absmax are themselves 8-bit codes:
``nested_quant_map[code] × nested_absmax + offset``, computed in float32 as bitsandbytes computes it.
``quant_state.bitsandbytes__nf4`` is the JSON that says so (shape, dtype, block sizes, offset).
8-bit (LLM.int8): ``<m>.weight`` int8 with ``<m>.SCB``, one float32 per row: the value is code × SCB / 127.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from ..quantized import QuantizedTensor, read_flat

STATE_PREFIX = ".quant_state.bitsandbytes__"
STATE_KINDS = ("nf4", "fp4")


@dataclass(frozen=True)
class Bnb4Tensor(QuantizedTensor):
    kind: str  # nf4 or fp4
    blocksize: int
    nested_blocksize: int | None
    offset: float

    @property
    def dtype(self) -> str:
        return self.kind.upper()

    @property
    def description(self) -> str:
        nested = ", nested" if self.nested_blocksize else ""
        return f"bitsandbytes 4-bit {self.kind.upper()} (blocks of {self.blocksize}{nested})"

    def rows(self, start: int, stop: int) -> torch.Tensor:
        codes, quant_map = self.parts[0], self.parts[2]
        width = math.prod(self.shape[1:])
        first, last = start * width, stop * width
        packed = read_flat(codes, first // 2, -(-last // 2)).view(torch.uint8)
        nibbles = torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(-1)
        nibbles = nibbles[first % 2:first % 2 + last - first].to(torch.int64)
        b0, b1 = first // self.blocksize, -(-last // self.blocksize)
        scales = self._absmax(b0, b1).to(torch.float64)
        values = read_flat(quant_map, 0, quant_map.numel).to(torch.float64)[nibbles]
        index = torch.arange(first, last) // self.blocksize - b0
        return values.mul_(scales[index]).reshape(stop - start, *self.shape[1:])

    def _absmax(self, b0: int, b1: int) -> torch.Tensor:
        """The float32 absmax of blocks [b0, b1)."""
        absmax = self.parts[1]
        if not self.nested_blocksize:
            return read_flat(absmax, b0, b1).to(torch.float32)
        nested_absmax, nested_map = self.parts[3], self.parts[4]
        codes = read_flat(absmax, b0, b1).view(torch.uint8).to(torch.int64)
        n0, n1 = b0 // self.nested_blocksize, -(-b1 // self.nested_blocksize)
        outer = read_flat(nested_absmax, n0, n1).to(torch.float32)
        table = read_flat(nested_map, 0, nested_map.numel).to(torch.float32)
        index = torch.arange(b0, b1) // self.nested_blocksize - n0
        return table[codes] * outer[index] + torch.tensor(self.offset, dtype=torch.float32)


@dataclass(frozen=True)
class Bnb8Tensor(QuantizedTensor):
    dtype = "INT8"
    description = "bitsandbytes 8-bit (LLM.int8, a scale per row)"

    def rows(self, start: int, stop: int) -> torch.Tensor:
        codes, scb = self.parts[:2]
        width = math.prod(self.shape[1:])
        values = read_flat(codes, start * width, stop * width).to(torch.float64).reshape(stop - start, -1)
        scale = read_flat(scb, start, stop).to(torch.float64)
        return values.mul_(scale.unsqueeze(1)).div_(127).reshape(stop - start, *self.shape[1:])


def bnb_tensors(stored: dict) -> tuple[dict[str, QuantizedTensor], list[str]]:
    """Every 4-bit and 8-bit weight among the stored tensors (by name), and every problem found."""
    found: dict[str, QuantizedTensor] = {}
    problems: list[str] = []
    for name, info in stored.items():
        if STATE_PREFIX in name:
            weight, _, kind = name.partition(STATE_PREFIX)
            made = _four_bit(weight, kind, info, stored)
        elif name.endswith(".SCB"):
            weight = name[: -len("SCB")] + "weight"
            made = _eight_bit(weight, info, stored)
        else:
            continue
        if isinstance(made, str):
            problems.append(made)
        else:
            found[weight] = made
    return found, problems


def _four_bit(weight: str, kind: str, state_info, stored: dict) -> Bnb4Tensor | str:
    try:
        state = json.loads(bytes(read_flat(state_info, 0, state_info.numel).view(torch.uint8).tolist()))
        shape = tuple(int(d) for d in state["shape"])
        blocksize = int(state["blocksize"])
        nested = "nested_blocksize" in state
        nested_blocksize = int(state["nested_blocksize"]) if nested else None
        offset = float(state.get("nested_offset", 0.0))
    except (ValueError, KeyError, TypeError) as e:
        return f"{weight}: its bitsandbytes quant_state is not readable ({e})"
    if kind not in STATE_KINDS or state.get("quant_type", kind) != kind:
        return f"{weight}: bitsandbytes 4-bit type {kind!r} is not nf4 or fp4"
    names = [weight, f"{weight}.absmax", f"{weight}.quant_map"]
    names += [f"{weight}.nested_absmax", f"{weight}.nested_quant_map"] if nested else []
    missing = [n for n in names if n not in stored]
    if missing:
        return f"{weight}: bitsandbytes 4-bit weight without {', '.join(missing)}"
    parts = tuple(stored[n] for n in names) + (state_info,)
    codes = parts[0]
    n = math.prod(shape)
    if codes.nbytes * 2 < n or blocksize <= 0 or parts[1].numel < -(-n // blocksize) or parts[2].numel != 16:
        return f"{weight}: bitsandbytes 4-bit data does not hold a {list(shape)} weight"
    return Bnb4Tensor(weight, shape, parts, kind, blocksize, nested_blocksize, offset)


def _eight_bit(weight: str, scb, stored: dict) -> Bnb8Tensor | str:
    codes = stored.get(weight)
    if codes is None or codes.dtype != "I8" or len(codes.shape) != 2 or scb.shape != codes.shape[:1]:
        return f"{weight}: bitsandbytes 8-bit SCB {list(scb.shape)} without an int8 weight of as many rows"
    extra = (stored[f"{weight}_format"],) if f"{weight}_format" in stored else ()
    return Bnb8Tensor(weight, codes.shape, (codes, scb) + extra)
