"""LoHa and LoKr on convolutions (a tiny diffusers UNet): their plain, full-kernel and CP forms, from peft's adapters
and from LyCORIS files in kohya's naming, against peft's own merge in float64, rounded once."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from helpers import load_tensors, run_cli
from safetensors.torch import save_file
from test_formats import _tiny_unet

from lora_merge import merge, verify

diffusers = pytest.importorskip("diffusers")
TARGETS = ["conv1", "conv2", "to_q", "to_v", "proj_in"]

# alpha / r a double that float32 holds too: peft's LoHa multiplies by torch.tensor(alpha / r), a float32
KINDS = {
    "loha": lambda: peft.LoHaConfig(r=4, alpha=6, target_modules=TARGETS, init_weights=False),
    "loha_cp": lambda: peft.LoHaConfig(r=4, alpha=6, target_modules=TARGETS, init_weights=False,
                                       use_effective_conv2d=True),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=TARGETS, init_weights=False),
    "lokr_full": lambda: peft.LoKrConfig(r=64, alpha=64, target_modules=TARGETS, init_weights=False),
    "lokr_cp": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=TARGETS, init_weights=False,
                                       use_effective_conv2d=True, decompose_both=True),
}


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet") / "unet"
    _tiny_unet(folder)
    return folder


def peft_adapter(unet, folder, config, seed: int = 5):
    """peft's adapter of ``config`` on the UNet, saved as peft saves it, and peft's merge of it in float64."""
    model = diffusers.UNet2DConditionModel.from_pretrained(unet)
    torch.manual_seed(seed)
    peft.inject_adapter_in_model(config, model)
    state = {k: v.detach().clone().contiguous() for k, v in peft.get_peft_model_state_dict(model).items()}
    folder.mkdir()
    save_file(state, str(folder / "adapter_model.safetensors"))
    config.save_pretrained(folder)
    exact = diffusers.UNet2DConditionModel.from_pretrained(unet).double()
    peft.inject_adapter_in_model(config, exact)
    exact.double()
    peft.set_peft_model_state_dict(exact, {k: v.double() for k, v in state.items()})
    for module in exact.modules():
        if isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer):
            module.merge()
    reference = {k.replace(".base_layer", ""): v.detach().clone() for k, v in exact.state_dict().items()
                 if "hada_" not in k and "lokr_" not in k}
    return state, reference


def assert_rounded_once(out, reference, base) -> int:
    ours = load_tensors(out)
    assert set(ours) == set(reference)
    changed = 0
    for name, got in ours.items():
        assert torch.equal(got, reference[name].to(got.dtype)), name  # float64 -> float32: one rounding
        changed += not torch.equal(got, base[name])
    return changed


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_conv_kinds_match_peft(kind, unet, tmp_path):
    state, reference = peft_adapter(unet, tmp_path / "adapter", KINDS[kind]())
    convs = [k for k, v in state.items() if k.endswith(("hada_w1_a", "lokr_w1", "lokr_w1_a"))]
    if kind.endswith("_cp"):
        assert any(k.endswith(("hada_t1", "lokr_t2")) for k in state)
    if kind == "lokr_full":
        assert any(k.endswith("lokr_w2") and v.dim() == 4 for k, v in state.items())
    result = merge(str(unet), str(tmp_path / "adapter"), tmp_path / "out", device="cpu", block_bytes=4096)
    assert result.stats.merged == len(convs)
    assert assert_rounded_once(tmp_path / "out", reference, load_tensors(unet)) == len(convs)
    assert verify(tmp_path / "out", str(unet), str(tmp_path / "adapter")).ok


def kohya_names(state: dict, alpha: float) -> dict:
    """peft's LoHa/LoKr tensors under LyCORIS's kohya-style names, an alpha per module."""
    out = {}
    for key, v in state.items():
        module, _, role = key.rpartition(".")
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.{role}"] = v
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


@pytest.mark.parametrize("kind, alpha", [("loha_cp", 6.0), ("loha", 6.0), ("lokr", 3.0), ("lokr_cp", 2.0),
                                         ("lokr_full", 7.0)])
def test_lycoris_files(kind, alpha, unet, tmp_path):
    """The same tensors in a LyCORIS file: alpha over the rank of a low-rank factor, as peft scales them. Where
    both of LoKr's factors are full, LyCORIS's scale is 1 whatever the file's alpha, and peft's alpha / r: the
    adapters whose modules may have two full factors are made with alpha = r (and lokr_full's file says 7)."""
    config = KINDS[kind]()
    if kind == "lokr":  # rank 1: every module's w2 is a low-rank product, scaled 3 / 1 by both
        config.r, config.alpha = 1, 3
    if kind == "lokr_cp":  # some modules' two factors are both full
        config.alpha = 2
    state, reference = peft_adapter(unet, tmp_path / "adapter", config)
    save_file(kohya_names(state, alpha), str(tmp_path / "lycoris.safetensors"))
    r = run_cli(str(unet), str(tmp_path / "lycoris.safetensors"), str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    changed = assert_rounded_once(tmp_path / "out", reference, load_tensors(unet))
    assert changed == sum(1 for k in state if k.endswith(("hada_w1_a", "lokr_w1", "lokr_w1_a")))
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["coverage"]["format"] == "kohya" and not report["coverage"]["left_over"]
