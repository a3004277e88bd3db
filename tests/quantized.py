"""Quantized checkpoints built in the test session, stored as the published ones are, and read back by code of
the tests' own (not lora-merge's) or by transformers.

FP8 (``quant_method: fp8``): transformers' own quantizer (FineGrainedFP8's ``Fp8Quantize``) where the blocks tile
the weights, or DeepSeek-V3's convention (a grid rounded up at the edges, scale = amax / 448 in float32) where
they do not. MXFP4 (``quant_method: mxfp4``): gpt-oss's layout (``*_blocks`` experts × out × groups × 16, the even
element in the low nibble; ``*_scales`` one exponent per group of 32; scale = the power of two at least amax / 6).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                    dtype=torch.float64)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _save(tensors: dict, src: Path, dst: Path, quantization_config: dict | None, shards: int = 1) -> Path:
    """``tensors`` in ``shards`` files (with an index when more than one), the rest of ``src`` copied."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".index.json")):
            shutil.copy(f, dst / f.name)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        per = math.ceil(len(names) / shards)
        for i in range(shards):
            part = {n: tensors[n] for n in names[i * per:(i + 1) * per]}
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, dst / file, metadata={"format": "pt"})
            weight_map |= {n: file for n in part}
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


# ----------------------------------------------------------------------------------------------------- FP8


def to_fp8(src: Path, dst: Path, block=(32, 32), *, which=lambda n: n.endswith("proj.weight"), own: bool = False,
           ue8m0: bool = False, shards: int = 1) -> Path:
    """``src`` (a bf16 checkpoint) with the tensors ``which`` picks stored as FP8 with ``weight_scale_inv``."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    qc = FineGrainedFP8Config(weight_block_size=block, scale_fmt="ue8m0" if ue8m0 else "float",
                              modules_to_not_convert=["lm_head"])
    quantize = Fp8Quantize(SimpleNamespace(quantization_config=qc))
    out = {}
    for name, value in _tensors(src).items():
        if not which(name):
            out[name] = value
        elif own:
            out[name], out[name + "_scale_inv"] = _deepseek_fp8(value, block)
        else:
            made = quantize._quantize_one(name, value)
            assert len(made) == 2, f"{name} {list(value.shape)} is not tiled by {block}"
            out.update(made)
    config = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
              "weight_block_size": list(block) if block else None, "modules_to_not_convert": ["lm_head"]}
    if ue8m0:
        config["scale_fmt"] = "ue8m0"
    return _save(out, src, dst, config, shards)


def _deepseek_fp8(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    bm, bn = block
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scales = torch.empty(-(-rows // bm), -(-cols // bn), dtype=torch.float32)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            part = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].to(torch.float32)
            s = part.abs().max() / 448
            scales[i, j] = s
            codes[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = (part / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    return codes, scales


def fp8_dense(codes: torch.Tensor, scales: torch.Tensor, block) -> torch.Tensor:
    """The exact float64 values of FP8 codes: each block times its scale, one block at a time."""
    w = codes.to(torch.float64)
    if scales.numel() == 1:
        return w * scales.to(torch.float64).reshape(())
    bm, bn = block
    s = scales.to(torch.float64).reshape(-(-w.shape[0] // bm), -(-w.shape[1] // bn))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] *= s[i, j]
    return w


# --------------------------------------------------------------------------------------------------- MXFP4


def to_mxfp4(src: Path, dst: Path, names=("gate_up_proj", "down_proj")) -> Path:
    """A bf16 gpt-oss checkpoint with its experts stored as MXFP4, as the gpt-oss releases store them."""
    out = {}
    for name, value in _tensors(src).items():
        if name.rsplit(".", 1)[-1] in names:
            out[name + "_blocks"], out[name + "_scales"] = _mxfp4(value)
        else:
            out[name] = value
    config = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                  "model.embed_tokens", "lm_head"]}
    return _save(out, src, dst, config)


def _mxfp4(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """experts × in × out -> blocks (experts × out × in/32 × 16) and scales (experts × out × in/32)."""
    w = dense.to(torch.float64).transpose(1, 2)
    e, o, i = w.shape
    groups = w.reshape(e, o, i // 32, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6)), torch.full_like(amax, -127))
    scaled = groups / torch.exp2(exponent)
    codes = (scaled.unsqueeze(-1) - E2M1).abs().argmin(-1).to(torch.uint8)  # the nearest value (ties: the first)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), (exponent.squeeze(-1) + 127).to(torch.uint8).contiguous()


def mxfp4_dense(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The exact float64 values (experts × in × out), decoded by transformers' own function."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------- dense


def dense_exact(folder: Path, dst: Path) -> Path:
    """A quantized checkpoint decoded exactly into float64, with the unquantized model's names."""
    config = json.loads((folder / "config.json").read_text())
    qc = config.get("quantization_config", {})
    stored = _tensors(folder)
    out = {}
    for name, value in stored.items():
        if name.endswith(("_scale_inv", "_scales")):
            continue
        if value.dtype == torch.float8_e4m3fn:
            scale = stored[name + "_scale_inv"]
            block = qc.get("weight_block_size") or value.shape
            out[name] = fp8_dense(value, scale.to(torch.float64), block)
        elif name.endswith("_blocks"):
            out[name[: -len("_blocks")]] = mxfp4_dense(value, stored[name[: -len("_blocks")] + "_scales"])
        else:
            out[name] = value.to(torch.float64)
    config.pop("quantization_config", None)
    config["dtype"] = "float64"
    dst.mkdir(parents=True)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
