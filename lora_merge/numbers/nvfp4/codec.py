"""NVFP4 as compressed-tensors stores it (format ``nvfp4-pack-quantized``): e2m1 codes, an e4m3 scale per 16 elements
and a float32 global scale per tensor.

``<name>_packed`` (uint8, out × in/2) holds two 4-bit e2m1 codes per byte along the input axis, element 2j in the low
nibble; ``<name>_scale`` (float8_e4m3fn, out × in/16) a scale per group of 16; ``<name>_global_scale`` (float32, [1])
the tensor's global scale G. The value is code · scale / G (in float64: the quotient rounded once, far below the
format's steps). A fresh group scale is e4m3(G · (largest |value| / 6)), the quotient and the product in float32,
as compressed-tensors' quantizer computes it; an all-zero group gets e4m3's epsilon (0.125), as there. G is kept, so
that the groups the adapter does not change keep their bytes (a group's scale is clamped to e4m3's largest, 448, as
the quantizer clamps it), unless a changed group's values would then pass 7 times its scale (6, e2m1's largest,
plus half its step there): then the tensor gets the global scale compressed-tensors gives it, 448·6 / its largest
|value| in float32 (as torch computes it: the reciprocal, then the product), and every group a fresh scale under
that (a first pass over the tensor finds out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..grid import E2M1, E4M3, e2m1_codes, e2m1_values
from ..quantized import QuantizedTensor

if TYPE_CHECKING:
    import torch

GROUP = 16
EPSILON = 0.125  # compressed-tensors' scale for an all-zero group of an FP8 scale dtype


@dataclass(frozen=True)
class Nvfp4Tensor(QuantizedTensor):
    dtype = "NVFP4"
    requantizable = True
    global_scale = True
    description = "NVFP4 (compressed-tensors: e2m1, an e4m3 scale per 16 elements and a global scale)"

    def part_rows(self, part: int, start: int, stop: int) -> tuple[int, int]:
        return (0, 1) if part == 2 else (start, stop)

    def decode(self, stored, start: int, stop: int) -> torch.Tensor:
        import torch

        packed = stored[0]
        codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)  # even element first
        return _spread(e2m1_values(codes), self.stored_scales(stored), torch.mul)

    def settle(self, prepared):
        """BASE's global scale, unless some changed group cannot be held under it: then the format's for the merged
        tensor, and every group re-scaled under it."""
        import torch

        largest, changed = prepared[:2]
        g = _g(self._global())
        # a group holds its values within half a step while they are at most 7 times its scale (6, e2m1's largest,
        # plus half its step there) at the largest scale e4m3 has; unchanged groups keep their bytes whatever they are
        if bool(((largest * g > 7.0 * E4M3.largest) & changed).any()):
            g = fresh_global(largest.max())
            changed = torch.ones_like(changed)
        return largest, changed, g

    def encode(self, values, original, start: int, stop: int, prepared):
        import torch

        packed, scale_codes, old_global = original
        largest, changed, g = prepared
        chosen = torch.where(changed, self.fresh_scales(largest, g=g), self.stored_scales(original))
        codes = e2m1_codes(E2M1.nearest(_spread(values, chosen, torch.div)))  # (rows, in)
        pairs = codes.reshape(codes.shape[0], -1, 2)
        made = pairs[..., 0] | (pairs[..., 1] << 4)  # (rows, in/2)
        new_packed = torch.where(changed.repeat_interleave(GROUP // 2, dim=1), made, packed)
        fresh = torch.where(_group_codes(largest, g) > 0, _group_codes(largest, g), EPSILON)
        new_scales = torch.where(changed, fresh.to(torch.float8_e4m3fn).view(torch.uint8), scale_codes.view(torch.uint8))
        new_global = torch.full(old_global.shape, float(g), dtype=torch.float32, device=old_global.device)
        return new_packed.contiguous(), new_scales.view(scale_codes.dtype), new_global

    def spacing(self, stored, exact, start: int, stop: int) -> torch.Tensor:
        return _spread(exact, self.stored_scales(stored), lambda x, scale: E2M1.spacing(x / scale).mul_(scale))

    def block_max(self, values, start: int, stop: int) -> torch.Tensor:
        return values.reshape(values.shape[0], -1, GROUP).amax(dim=-1)

    def stored_scales(self, stored) -> torch.Tensor:
        import torch

        return stored[1].to(torch.float64) / _g(stored[2])

    def fresh_scales(self, largest, stored=None, g=None) -> torch.Tensor:
        """Each group's scale value (its e4m3 code / G, float64) for its largest |value|, under the global scale
        ``g``, else the one in ``stored``, else BASE's."""
        import torch

        if g is None:
            g = _g(stored[2] if stored is not None else self._global())
        codes = _group_codes(largest, g)
        return torch.where(codes > 0, codes, EPSILON) / g

    def check_global(self, stored, largest: float):
        found, base = float(_g(stored[2])), float(_g(self._global()))
        if found == base:
            return None
        import torch

        expected = float(fresh_global(torch.tensor(largest, dtype=torch.float64)))
        return None if found == expected else (found, expected)

    def _global(self):
        from ..quantized import read_rows

        return read_rows(self.parts[2], 0, 1)


def fresh_global(largest) -> torch.Tensor:
    """The global scale compressed-tensors gives a tensor whose largest |value| is ``largest``: 448·6 / it in
    float32 (1 where that is not finite), as a float64 scalar."""
    import torch

    # ``2688 / x`` on a float32 tensor, as the quantizer writes it: torch takes the reciprocal, then multiplies
    g = largest.to(torch.float32).clamp(min=torch.finfo(torch.float32).tiny).reciprocal() * (E4M3.largest * 6.0)
    return torch.where(torch.isfinite(g), g, 1.0).to(torch.float64)


def _group_codes(largest, g) -> torch.Tensor:
    """e4m3(G · (largest / 6)) clamped to 448, the quotient and the product in float32, as compressed-tensors'
    quantizer computes it (float64)."""
    import torch

    wanted = (largest.to(torch.float32) / 6.0) * g.to(torch.float32)
    return E4M3.nearest(wanted.to(torch.float64).clamp_(max=E4M3.largest))


def _g(global_scale) -> torch.Tensor:
    """The global scale as a float64 scalar tensor."""
    import torch

    return global_scale.reshape(-1)[0].to(torch.float64)


def _spread(dense, grid, op):
    """``op(dense, each element's group value)``: ``grid`` (rows, in/16), ``dense`` (rows, in)."""
    rows = dense.shape[0]
    out = op(dense.reshape(rows, -1, GROUP), grid.unsqueeze(-1))
    return out.reshape(dense.shape)


def nvfp4_tensor(name: str, packed, scale, global_scale) -> Nvfp4Tensor | str:
    """The dense view of ``<name>_packed`` with its scales (TensorInfos), or why they do not fit."""
    if packed.dtype != "U8" or scale.dtype != "F8_E4M3" or global_scale.dtype != "F32":
        return (f"{name}: NVFP4 parts are uint8 codes, e4m3 scales and a float32 global scale, found {packed.dtype}, "
                f"{scale.dtype} and {global_scale.dtype}")
    if len(packed.shape) != 2 or list(global_scale.shape) not in ([1], []):
        return f"{name}: NVFP4 codes of shape {list(packed.shape)} with a global scale {list(global_scale.shape)}"
    out, half = packed.shape
    if half * 2 % GROUP or list(scale.shape) != [out, half * 2 // GROUP]:
        return f"{name}: NVFP4 scales {list(scale.shape)} are not one per 16 elements of {out}×{half * 2} codes"
    return Nvfp4Tensor(name, (out, half * 2), (packed, scale, global_scale))
