"""compressed-tensors FP8 (``float-quantized``) and NVFP4 (``nvfp4-pack-quantized``) bases, built by the
compressed-tensors library's own quantizer and compressor: kept in their format (each changed group re-scaled as its
quantizer scales it, every element the nearest value of the format at its scale) or dequantized, against peft's
float64 merge of the exactly decoded base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import build_adapter, build_model, load_tensors, peft, transformers, ulps
from safetensors.torch import load_file, save_file

from lora_merge import merge, verify
from lora_merge.errors import QuantizationError

ct = pytest.importorskip("compressed_tensors")
FP8_MAX = 448.0


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed")
    build_model("qwen3", root / "bf16", dtype=torch.bfloat16, hidden_size=64, intermediate_size=96, head_dim=16,
                tie_word_embeddings=False)
    build_adapter(root / "bf16", root / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return root


def save_compressed(model, dst, form: str):
    """``model``, its quantization calibrated, compressed and saved by compressed-tensors' own compressor."""
    from compressed_tensors.compressors import ModelCompressor

    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=form)
    compressor.compress_model(model)
    model.save_pretrained(dst)
    compressor.update_config(dst)
    return dst


def compress(src, dst, strategy: str):
    """``src`` quantized to FP8 by compressed-tensors: its observer's scales, its compressor's codes and config."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    block = {"block_structure": [32, 32]} if strategy == "block" else {}
    weights = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False, **block)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                                ignore=["lm_head"], format="float-quantized")
    apply_quantization_config(model, config)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.detach()
            if strategy == "block":
                w = w.reshape(w.shape[0] // 32, 32, w.shape[1] // 32, 32).transpose(1, 2)
            dims = {"dim": (-2, -1) if strategy == "block" else 1, "keepdim": strategy == "channel"} \
                if strategy != "tensor" else {}
            scale, zero = calculate_qparams(w.amin(**dims), w.amax(**dims), module.quantization_scheme.weights)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    save_compressed(model, dst, "float-quantized")
    for f in src.iterdir():  # the tokenizer and the rest
        if not (dst / f.name).exists():
            shutil.copy(f, dst / f.name)
    return dst


def spread(scale: torch.Tensor, shape) -> torch.Tensor:
    """Each element's scale (float64), from one per tensor, per row ([out, 1]) or per block ([out/bm, in/bn])."""
    scale = scale.to(torch.float64)
    if scale.numel() == 1:
        return scale.reshape(()).expand(shape)
    grid = scale.reshape(scale.shape[0], -1)
    return grid.repeat_interleave(shape[0] // grid.shape[0], 0).repeat_interleave(shape[1] // grid.shape[1], 1)


def block_amax(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The largest |value| of each scale's group, in the scale's shape."""
    a = values.abs()
    if scale.numel() == 1:
        return a.amax().reshape(scale.shape)
    rows, cols = scale.reshape(scale.shape[0], -1).shape
    return a.reshape(rows, a.shape[0] // rows, cols, a.shape[1] // cols).amax(dim=(1, 3)).reshape(scale.shape)


def decode(tensors) -> dict[str, torch.Tensor]:
    """Every tensor as its dense value, in float64: code × its group's scale."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale"):
            continue
        out[name] = t.to(torch.float64)
        if t.dtype == torch.float8_e4m3fn:
            out[name] = out[name] * spread(tensors[name + "_scale"], t.shape)
    return out


def oracle(base, adapter, tmp) -> dict[str, torch.Tensor]:
    """peft's merge in float64 of the exactly decoded base."""
    dense = tmp / "exact"
    dense.mkdir()
    save_file(decode(load_tensors(base)), dense / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config.pop("quantization_config")
    (dense / "config.json").write_text(json.dumps(config | {"dtype": "float64"}))
    model = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float64)
    merged = peft.PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=False).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("strategy", ["channel", "tensor", "block"])
def test_compressed_fp8_keeps_its_format(bf16, tmp_path, strategy):
    base = compress(bf16 / "bf16", tmp_path / "ct", strategy)
    result = merge(base, bf16 / "adapter", tmp_path / "out", device="cpu")
    assert result.report.ok
    out, before = load_tensors(tmp_path / "out"), load_tensors(base)
    assert {n: (t.dtype, t.shape) for n, t in out.items()} == {n: (t.dtype, t.shape) for n, t in before.items()}
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    expected = oracle(base, bf16 / "adapter", tmp_path)
    merged = {e.name for e in result.plan.entries if e.is_merge}
    assert merged and all(before[n].dtype == torch.float8_e4m3fn for n in merged)
    got = decode(out)
    for name in merged:
        want, scale = expected[name], out[name + "_scale"]
        rule = (block_amax(want, scale) / FP8_MAX).float().to(scale.dtype)  # in float32, then the scales' dtype
        assert torch.equal(scale, rule), name
        each = spread(scale, want.shape)
        step = torch.exp2(torch.floor(torch.log2((want / each).abs())).clamp(min=-6) - 3) * each
        assert ((got[name] - want).abs() <= step / 2 * (1 + 1e-9)).all(), name
    for name, t in out.items():  # everything else is BASE's bytes
        if name.removesuffix("_scale") not in merged:
            assert torch.equal(t.view(torch.uint8), before[name].view(torch.uint8)), name
    verdicts = result.report.tensors
    assert all(verdicts[n].check == "requantized" and verdicts[n].correctly_rounded for n in merged)
    assert "compressed-tensors" in verdicts[next(iter(merged))].format
    assert verify(tmp_path / "out", base, bf16 / "adapter", device="cpu").ok  # read back and checked the same way
    # transformers, with compressed-tensors, loads the output to the same values
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    state = loaded.state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(state[name].view(torch.uint8), out[name].view(torch.uint8))
    assert torch.isfinite(loaded(torch.tensor([[1, 5, 9]])).logits).all()


def test_compressed_fp8_dequantized_and_a_zero_adapter(bf16, tmp_path):
    base = compress(bf16 / "bf16", tmp_path / "ct", "channel")
    result = merge(base, bf16 / "adapter", tmp_path / "out16", device="cpu", dtype="bfloat16")
    assert result.report.ok
    assert "quantization_config" not in json.loads((tmp_path / "out16" / "config.json").read_text())
    expected, dense = oracle(base, bf16 / "adapter", tmp_path), load_tensors(tmp_path / "out16")
    assert not any(n.endswith("_scale") for n in dense)
    for name, want in expected.items():
        assert ulps(dense[name], want, torch.bfloat16).max() <= 0.5, name
    # a zero adapter leaves the checkpoint byte-identical
    build_adapter(bf16 / "bf16", tmp_path / "zero", r=4, target_modules=["q_proj"], init_lora_weights=True)
    assert merge(base, tmp_path / "zero", tmp_path / "same", device="cpu").report.ok
    assert (tmp_path / "same" / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()


@pytest.mark.parametrize("form", ["pack-quantized", "int-quantized", "mxfp4-pack-quantized"])
def test_other_compressed_formats_are_refused_by_name(bf16, tmp_path, form):
    base = compress(bf16 / "bf16", tmp_path / "ct", "channel")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"]["format"] = form
    for group in config["quantization_config"]["config_groups"].values():
        group["format"] = form
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match=form):
        merge(base, bf16 / "adapter", tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def compress_nvfp4(src, dst):
    """``src`` quantized to NVFP4 by compressed-tensors: its global and group scales, its compressor's packing."""
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.quant_scheme import (
        PRESET_SCHEMES,
        QuantizationScheme,
    )
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    scheme = QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES["NVFP4A16"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                                        format="nvfp4-pack-quantized"))
    for module in model.modules():
        if hasattr(module, "weight_global_scale"):
            w = module.weight.detach()
            g = generate_gparam(w.amin(), w.amax())
            module.weight_global_scale.data.copy_(g.reshape(module.weight_global_scale.shape))
            groups = w.reshape(w.shape[0], -1, 16)
            scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), module.quantization_scheme.weights,
                                            global_scale=g)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    return save_compressed(model, dst, "nvfp4-pack-quantized")


E2M1_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)


def nvfp4_decode(tensors) -> dict[str, torch.Tensor]:
    """Every tensor as its dense value (float64): e2m1 code · group scale / global scale."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(("_scale", "_global_scale")):
            continue
        if name.endswith("_packed"):
            dense = name[: -len("_packed")]
            nibbles = torch.stack((t & 15, t >> 4), dim=-1).reshape(t.shape[0], -1).long()
            codes = E2M1_VALUES[nibbles & 7] * torch.where(nibbles >= 8, -1.0, 1.0).double()
            scale = tensors[dense + "_scale"].to(torch.float64) / tensors[dense + "_global_scale"].double()
            out[dense] = codes * scale.repeat_interleave(16, dim=1)
        else:
            out[name] = t.to(torch.float64)
    return out


def faint(adapter, folder, factor: float):
    """A copy of ``adapter`` with every B multiplied by ``factor``: a change too small to move most tensors' largest
    |value| out of their global scale's reach."""
    folder.mkdir()
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: t * factor if "lora_B" in k else t for k, t in tensors.items()}, folder / "adapter_model.safetensors")
    shutil.copy(adapter / "adapter_config.json", folder / "adapter_config.json")
    return folder


@pytest.mark.parametrize("strength", [1.0, 0.01])
def test_compressed_nvfp4_keeps_its_format(bf16, tmp_path, strength):
    base = compress_nvfp4(bf16 / "bf16", tmp_path / "nv")
    adapter = faint(bf16 / "adapter", tmp_path / "adapter", strength)
    result = merge(base, adapter, tmp_path / "out", device="cpu")
    assert result.report.ok
    out, before = load_tensors(tmp_path / "out"), load_tensors(base)
    assert {n: (t.dtype, t.shape) for n, t in out.items()} == {n: (t.dtype, t.shape) for n, t in before.items()}
    dense = tmp_path / "exact"
    dense.mkdir()
    save_file(nvfp4_decode(before), dense / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config.pop("quantization_config")
    (dense / "config.json").write_text(json.dumps(config | {"dtype": "float64"}))
    model = transformers.AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float64)
    expected = peft.PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=False).merge_and_unload()
    expected = expected.state_dict()
    got, old = nvfp4_decode(out), nvfp4_decode(before)
    merged = {e.name for e in result.plan.entries if e.is_merge}
    assert merged and all(n + "_packed" in before for n in [m[: -len(".weight")] + ".weight" for m in merged])
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    args = PRESET_SCHEMES["NVFP4A16"]["weights"]
    groups = kept = 0
    for name in merged:
        want, g = expected[name], out[name + "_global_scale"]
        grouped = want.reshape(want.shape[0], -1, 16).float()  # the exact merge, as the quantizer's float32 input
        low, high = grouped.amin(-1), grouped.amax(-1)
        changed = (want != old[name]).reshape(want.shape[0], -1, 16).any(-1)
        base_g = before[name + "_global_scale"]
        if torch.equal(g, base_g):  # BASE's global scale kept: only changed groups re-scaled, under it
            assert (calculate_qparams(low, high, args, global_scale=base_g)[0].float() <= 448).all(), name
            kept += 1
        else:  # the quantizer's global scale for the merged tensor, and every group re-scaled under it
            assert torch.equal(g, generate_gparam(want.min().float(), want.max().float()).reshape(g.shape)), name
            changed = torch.ones_like(changed)
        codes = out[name + "_scale"].to(torch.float64)
        rule = calculate_qparams(low, high, args, global_scale=g)[0].to(torch.float64)  # its quantizer's scales
        assert torch.equal(codes[changed], rule[changed]), name
        same = ~changed.repeat_interleave(8, dim=1)
        assert torch.equal(out[name + "_packed"][same], before[name + "_packed"][same]), name
        each = (codes / g.double()).repeat_interleave(16, dim=1)
        x = (want / each).abs()
        step = torch.exp2(torch.floor(torch.log2(x.clamp(min=1))) - 1) * each  # e2m1: steps of 0.5, 1, 2 at 0, 2, 4
        assert ((got[name] - want).abs() <= step / 2 * (1 + 1e-9)).all(), name
        groups += int(changed.sum())
    assert groups > 0
    assert (kept > 0) == (strength < 1), kept  # a strong change moves every tensor's largest value: all re-scaled
    assert "NVFP4" in result.report.tensors[next(iter(merged))].format
    # a global scale that is neither BASE's nor the quantizer's fails, even with the group scales halved to match
    name = sorted(merged)[0]
    tampered = dict(out)
    tampered[name + "_global_scale"] = out[name + "_global_scale"] / 2
    tampered[name + "_scale"] = (out[name + "_scale"].float() / 2).to(torch.float8_e4m3fn)
    (tmp_path / "tampered").mkdir()
    save_file(tampered, tmp_path / "tampered" / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(tmp_path / "out" / "config.json", tmp_path / "tampered" / "config.json")
    report = verify(tmp_path / "tampered", base, adapter, device="cpu")
    assert not report.ok and report.failed_tensors == [name]
    assert report.tensors[name].failed_elements == 0 and report.tensors[name].scale_failures == 1
    # transformers, with compressed-tensors, loads the output and runs it
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert torch.isfinite(loaded(torch.tensor([[1, 5, 9]])).logits).all()
    assert verify(tmp_path / "out", base, adapter, device="cpu").ok
    # dequantized: every element the exact merge rounded once to bfloat16
    # a zero adapter leaves the checkpoint byte-identical
    build_adapter(bf16 / "bf16", tmp_path / "zero", r=4, target_modules=["q_proj"], init_lora_weights=True)
    assert merge(base, tmp_path / "zero", tmp_path / "same", device="cpu").report.ok
    assert (tmp_path / "same" / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    result = merge(base, adapter, tmp_path / "out16", device="cpu", dtype="bfloat16")
    assert result.report.ok
    written = load_tensors(tmp_path / "out16")
    for name in merged:
        assert ulps(written[name], expected[name], torch.bfloat16).max() <= 0.5, name
