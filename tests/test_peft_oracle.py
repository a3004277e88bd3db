"""Merged tensors against peft's own merge_and_unload, one case per kind of adapter."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    build_adapter,
    forward_logits,
    load_tensors,
    peft_reference,
    ulps,
    unmerged_logits,
)

from lora_merge import merge

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CASES = {
    "plain": ("llama", dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR)),
    "sharded_patterns": ("llama_sharded", dict(
        r=4, lora_alpha=16, target_modules=ALL_LINEAR,
        rank_pattern={"^model.layers.0.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"layers.1.mlp.up_proj": 3})),
    "rslora": ("llama", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj"])),
    "embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"])),
    "dora_embedding": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens"])),
    "lora_bias": ("qwen2", dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "k_proj"])),
    "bias_all": ("qwen2", dict(r=4, lora_alpha=8, bias="all", target_modules=["q_proj", "v_proj"])),
    "bias_lora_only": ("qwen2", dict(r=4, lora_alpha=8, bias="lora_only", target_modules=["q_proj"])),
    "modules_to_save": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "gpt2_conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "gpt2_dora": ("gpt2", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_proj"],
                               fan_in_fan_out=True)),
    "trainable_tokens": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"],
                                       trainable_token_indices=[3, 7, 40])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_peft(case, models, tmp_path):
    base_name, kwargs = CASES[case]
    base = models[base_name]
    build_adapter(base, tmp_path / "adapter", **kwargs)
    # tiny blocks: every tensor is merged in several row blocks, as large ones are
    result = merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu", block_bytes=2048)
    assert result.stats.merged > 0
    ours = load_tensors(tmp_path / "out")
    ref = peft_reference(base, tmp_path / "adapter")
    base_tensors = load_tensors(base)
    assert set(ours) == set(base_tensors)
    changed = 0
    for name, got in ours.items():
        want = ref[name]
        assert got.shape == want.shape, name
        assert got.dtype == base_tensors[name].dtype, name
        # peft computes in float32; ours is the exactly rounded value: a few float32 ulps apart at most
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
        if not torch.equal(got, base_tensors[name]):
            changed += 1
    assert changed == result.stats.merged
    torch.testing.assert_close(forward_logits(tmp_path / "out"), unmerged_logits(base, tmp_path / "adapter"),
                               rtol=1e-4, atol=1e-5)


def test_bf16_base_rounds_once(models, tmp_path):
    """bf16 base: within one ulp of peft's float32 merge rounded once, and equal to the exactly rounded value."""
    base = models["llama_bf16"]
    build_adapter(base, tmp_path / "adapter", r=8, lora_alpha=16, target_modules=ALL_LINEAR)
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    ours = load_tensors(tmp_path / "out")
    ref = peft_reference(base, tmp_path / "adapter")
    base_tensors = load_tensors(base)
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    exact_checked = 0
    for name, got in ours.items():
        assert got.dtype == torch.bfloat16
        assert ulps(got, ref[name].to(torch.bfloat16), torch.bfloat16).max() <= 1, name
        module = name.removesuffix(".weight")
        a_key = f"base_model.model.{module}.lora_A.weight"
        if a_key in adapter:
            a = adapter[a_key].double()
            b = adapter[a_key.replace("lora_A", "lora_B")].double()
            exact = base_tensors[name].double() + 2.0 * (b @ a)
            assert torch.equal(got.view(torch.int16), round_bf16_reference(exact).view(torch.int16)), name
            exact_checked += 1
    assert exact_checked == 2 * len(ALL_LINEAR)


def round_bf16_reference(x: torch.Tensor) -> torch.Tensor:
    """float64 -> bfloat16, round to nearest even, by integer arithmetic on the float64 bits."""
    import numpy as np

    bits = x.numpy().view(np.uint64).astype(np.uint64)
    sign = (bits >> np.uint64(63)).astype(np.uint64)
    exp = ((bits >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64)
    mant = (bits & np.uint64((1 << 52) - 1)) | np.uint64(1 << 52)  # normal numbers only in these tests
    assert (exp > 0).all() and (exp - 1023 > -126).all()
    shift = np.uint64(52 - 7)
    kept = mant >> shift
    rest = mant & np.uint64((1 << 45) - 1)
    half = np.uint64(1 << 44)
    up = (rest > half) | ((rest == half) & ((kept & np.uint64(1)) == np.uint64(1)))
    kept = kept + up.astype(np.uint64)
    overflow = kept >> np.uint64(8)
    kept = np.where(overflow > 0, kept >> np.uint64(1), kept)
    e = exp - 1023 + overflow.astype(np.int64) + 127
    out = (sign << np.uint64(15)) | (e.astype(np.uint64) << np.uint64(7)) | (kept & np.uint64(0x7F))
    return torch.from_numpy(out.astype(np.uint16).view(np.int16)).view(torch.bfloat16).reshape(x.shape)


def test_zero_b_reproduces_base_bit_for_bit(models, tmp_path):
    base = models["llama_bf16"]
    build_adapter(base, tmp_path / "adapter", r=4, target_modules=ALL_LINEAR, init_lora_weights=True)
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    for shard in base.glob("*.safetensors"):
        assert (tmp_path / "out" / shard.name).read_bytes()[-1000:] == shard.read_bytes()[-1000:]
    ours, theirs = load_tensors(tmp_path / "out"), load_tensors(base)
    for name in theirs:
        assert torch.equal(ours[name].view(torch.int16), theirs[name].view(torch.int16)), name


def test_sharded_layout_kept(models, tmp_path):
    base = models["llama_sharded"]
    build_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == base_index["weight_map"]
    assert out_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_tensors(base).values())
    from safetensors import safe_open

    for shard in sorted(set(base_index["weight_map"].values())):
        with safe_open(tmp_path / "out" / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}

