"""MXFP4 checkpoints (``quant_method: mxfp4``, gpt-oss): experts stored as e2m1 codes with e8m0 scales.

``<name>_blocks`` (uint8, experts × out × groups × 16) packs two 4-bit e2m1 codes per byte, the even
element in the low nibble; ``<name>_scales`` (uint8, experts × out × groups) holds one exponent per group
of 32 elements along the input axis: the group's scale is 2^(byte − 127). transformers dequantizes to
``<name>`` of shape experts × in × out (the stored matrices transposed), and so does this codec. A fresh
scale is the smallest power of two at least the group's largest |value| / 6 (e2m1's largest value), as
gpt-oss's quantizer rounds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from ..grid import E2M1, e2m1_codes, e2m1_values, smallest_power_of_two
from ..quantized import QuantizedTensor
from .spec import GROUP

BIAS = 127


@dataclass(frozen=True)
class Mxfp4Tensor(QuantizedTensor):
    dtype = "MXFP4"
    requantizable = True
    exponent_bytes = True
    description = "MXFP4 (e2m1, a power-of-two scale per 32 elements)"

    def part_rows(self, part: int, start: int, stop: int) -> tuple[int, int]:
        return start, stop  # experts

    def decode(self, stored, start: int, stop: int) -> torch.Tensor:
        import torch

        blocks, scale_bytes = stored
        pairs = blocks.permute(0, 2, 3, 1)  # (k, G, 16, out): the dense layout's order, 1 byte per pair
        codes = torch.stack((pairs & 0x0F, pairs >> 4), dim=3)  # (k, G, 16, 2, out): even element first
        values = e2m1_values(codes).reshape(blocks.shape[0], -1, blocks.shape[1])  # (k, in, out)
        return _spread(values, self._scale_values(scale_bytes), torch.mul)

    def encode(self, values, original, start: int, stop: int, prepared):
        import torch

        blocks, scale_bytes = original
        largest, changed = prepared
        chosen = torch.where(changed, self.fresh_scales(largest), self._scale_values(scale_bytes))
        codes = e2m1_codes(E2M1.nearest(_spread(values, chosen, torch.div)))  # (k, in, out)
        codes = codes.reshape(codes.shape[0], -1, GROUP // 2, 2, codes.shape[2])  # (k, G, 16, 2, out)
        packed = (codes[:, :, :, 0] | (codes[:, :, :, 1] << 4)).permute(0, 3, 1, 2)  # (k, out, G, 16)
        new_blocks = torch.where(changed.unsqueeze(-1), packed, blocks)
        exponents = (torch.frexp(chosen)[1] - 1 + BIAS).to(torch.uint8)
        return new_blocks.contiguous(), torch.where(changed, exponents, scale_bytes)

    def spacing(self, stored, exact, start: int, stop: int) -> torch.Tensor:
        return _spread(exact, self._scale_values(stored[1]), lambda x, scale: E2M1.spacing(x / scale).mul_(scale))

    def block_max(self, values, start: int, stop: int) -> torch.Tensor:
        return _groups(values).amax(dim=2).transpose(1, 2)

    def block_any(self, mask, start: int, stop: int) -> torch.Tensor:
        return _groups(mask).any(dim=2).transpose(1, 2)

    def stored_scales(self, stored) -> torch.Tensor:
        return self._scale_values(stored[1])

    def fresh_scales(self, largest, stored=None) -> torch.Tensor:
        import torch

        exponent = smallest_power_of_two(largest, E2M1.largest).clamp_(-BIAS, BIAS)
        exponent = torch.where(largest > 0, exponent, -BIAS)  # an all-zero group: exponent byte 0, as gpt-oss's
        return torch.ldexp(torch.ones_like(largest), exponent)

    @staticmethod
    def _scale_values(scale_bytes) -> torch.Tensor:
        import torch

        ones = torch.ones(scale_bytes.shape, dtype=torch.float64, device=scale_bytes.device)
        return torch.ldexp(ones, scale_bytes.to(torch.int64) - BIAS)


def _groups(dense):
    """Dense rows (k, in, out) as groups of 32 along the input axis: a view (k, in / 32, 32, out)."""
    k, inner, out = dense.shape
    return dense.reshape(k, inner // GROUP, GROUP, out)


def _spread(dense, grid, op):
    """``op(dense, each element's group value)``: ``grid`` (k, out, G) is the stored layout's, ``dense`` (k, in, out)."""
    out = op(_groups(dense), grid.transpose(1, 2).unsqueeze(2))
    return out.reshape(dense.shape)


def mxfp4_tensor(name: str, blocks, scales) -> Mxfp4Tensor | str:
    """The dense view of ``<name>_blocks`` with ``<name>_scales`` (TensorInfos), or why they do not fit."""
    if blocks.dtype != "U8" or scales.dtype != "U8":
        return f"{name}: MXFP4 blocks and scales are uint8, found {blocks.dtype} and {scales.dtype}"
    if len(blocks.shape) != 4 or blocks.shape[-1] != GROUP // 2 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        return (f"{name}: MXFP4 blocks {list(blocks.shape)} with scales {list(scales.shape)} are not "
                "experts × out × groups × 16 with a scale per group")
    experts, out, groups, _ = blocks.shape
    return Mxfp4Tensor(name, (experts, groups * GROUP, out), (blocks, scales))
