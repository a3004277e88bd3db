"""Layers the tiny language models do not have: convolutions and stacked MoE expert parameters."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from helpers import load_tensors
from safetensors.torch import save_file
from torch import nn

from lora_merge import merge


class Experts(nn.Module):
    def __init__(self, e, d_in, d_out, transposed):
        super().__init__()
        self.is_transposed = transposed
        shape = (e, d_in, d_out) if transposed else (e, d_out, d_in)
        self.gate_up_proj = nn.Parameter(torch.randn(shape) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(e, 12, 10) * 0.1)

    def forward(self, x):
        return x


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 16, 1)
        self.head = nn.Conv1d(16, 6, 5)
        self.proj = nn.Linear(6, 4)

    def forward(self, x):
        return self.proj(self.head(self.point(self.stem(x)).mean(-1)).mean(-1))


class MoE(nn.Module):
    def __init__(self, transposed):
        super().__init__()
        self.experts = Experts(4, 10, 24, transposed)
        self.router = nn.Linear(10, 4)

    def forward(self, x):
        return x


def save_base(model, folder):
    folder.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "custom"}))


def reference(make, base, adapter):
    model = make()
    model.load_state_dict(load_tensors(base))
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return merged.state_dict()


def run_case(tmp_path, make, config):
    torch.manual_seed(0)
    model = make()
    save_base(model, tmp_path / "base")
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "magnitude" in name:
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(tmp_path / "adapter")
    merge(str(tmp_path / "base"), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    ours, ref = load_tensors(tmp_path / "out"), reference(make, tmp_path / "base", tmp_path / "adapter")
    base = load_tensors(tmp_path / "base")
    changed = [k for k in ours if not torch.equal(ours[k], base[k])]
    for k in ours:
        torch.testing.assert_close(ours[k], ref[k], rtol=2e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")
    return changed


@pytest.mark.parametrize("dora", [False, True])
def test_conv_lora(tmp_path, dora):
    config = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["stem", "point", "head", "proj"],
                             use_dora=dora, init_lora_weights=False)
    changed = run_case(tmp_path, ConvNet, config)
    assert set(changed) == {"stem.weight", "point.weight", "head.weight", "proj.weight"}


@pytest.mark.parametrize("transposed", [False, True])
def test_target_parameters_experts(tmp_path, transposed):
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=[], init_lora_weights=False,
                             target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    changed = run_case(tmp_path, lambda: MoE(transposed), config)
    assert set(changed) == {"experts.gate_up_proj", "experts.down_proj"}
