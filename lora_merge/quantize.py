"""``--quantize fp8``: which of BASE's float tensors OUT stores as FP8, and the config that says so.

The layout DeepSeek-V3 and Qwen3-FP8 releases use and transformers' FineGrainedFP8 loads: each Linear weight as
float8_e4m3fn with a float32 ``weight_scale_inv`` per 128×128 block, every element the nearest e4m3 value of the
exact W + s·B·A at its block's scale (``quant.fp8.Fp8Quantized``), rounded once. Embeddings, norms, the output
layer, routers, experts stored stacked and any matrix whose sides are not multiples of 128 (transformers cannot load
partial blocks) stay in BASE's dtype, and ``modules_to_not_convert`` names each of them.
"""

from __future__ import annotations

import math

from .dtypes import FLOAT_DTYPES
from .quant.fp8 import Fp8Quantized
from .safetensors_file import TensorInfo

METHODS = ("fp8",)
BLOCK = (128, 128)
KEPT = ("lm_head", "embed_out", "output", "gate", "router", "score", "classifier")  # a module's last name


def module(name: str) -> str:
    return name.removesuffix(".weight")


def quantizable(name: str, info) -> bool:
    """A Linear weight OUT stores as FP8."""
    if not isinstance(info, TensorInfo) or info.dtype not in FLOAT_DTYPES or len(info.shape) != 2:
        return False
    if not name.endswith(".weight") or any(part in module(name).lower() for part in ("embed", "norm")):
        return False
    return module(name).rsplit(".", 1)[-1] not in KEPT and all(n % b == 0 for n, b in zip(info.shape, BLOCK))


def quantized(name: str, info: TensorInfo) -> Fp8Quantized:
    """The FP8 form of BASE's ``info``: OUT's codes and scales, planned (start -1: not written yet)."""
    rows, cols = info.shape
    grid = (math.ceil(rows / BLOCK[0]), math.ceil(cols / BLOCK[1]))
    codes = TensorInfo(name, info.path, "F8_E4M3", info.shape, -1, rows * cols)
    scales = TensorInfo(module(name) + ".weight_scale_inv", info.path, "F32", grid, -1, 4 * math.prod(grid))
    return Fp8Quantized(name, info.shape, (codes, scales), BLOCK, False, "quantize", source=info)


def quantization_config(tensors: dict) -> dict:
    """config.json's ``quantization_config`` for OUT: the modules of every matrix left in BASE's dtype named."""
    kept = {module(n) for n, info in tensors.items()
            if isinstance(info, TensorInfo) and len(info.shape) == 2 and n.endswith(".weight") and not quantizable(n, info)}
    # experts stored stacked (experts × out × in) stay in BASE's dtype too: their module is the parameter's owner
    kept |= {n.rsplit(".", 1)[0] for n, info in tensors.items()
             if isinstance(info, TensorInfo) and len(info.shape) == 3 and info.dtype in FLOAT_DTYPES}
    kept = sorted(kept | {"lm_head"})
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK),
            "modules_to_not_convert": kept}
