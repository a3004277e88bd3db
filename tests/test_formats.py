"""Adapter formats beyond peft, each against its own library where that runs here."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_model, expect_error, load_tensors, run_cli
from safetensors.torch import save_file

from lora_merge.formats import detect_format

# float32 bases: the libraries round s·B·A to float32 before adding it, lora-merge rounds once
CLOSE = {"rtol": 2e-6, "atol": 1e-7}


def assert_merged_like(out, reference: dict, base: dict):
    got = load_tensors(out)
    assert set(got) == set(reference)
    changed = 0
    for name, want in reference.items():
        torch.testing.assert_close(got[name], want, **CLOSE, msg=lambda m, name=name: f"{name}: {m}")
        changed += not torch.equal(got[name], base[name])
    report = json.loads((out / "merge_report.json").read_text())
    assert report["status"] == "passed" and report["coverage"]["left_over"] == []
    return changed


# ------------------------------------------------------------------------------------------- loralib

def _loralib_toy(fan_in_fan_out: bool):
    lora = pytest.importorskip("loralib")

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = lora.Embedding(50, 16, r=4, lora_alpha=8)
            self.fc = lora.Linear(16, 24, r=4, lora_alpha=8, fan_in_fan_out=fan_in_fan_out)
            # GPT-2's fused q,k,v with LoRA on q and v only
            self.qkv = lora.MergedLinear(16, 48, r=4, lora_alpha=8, enable_lora=[True, False, True],
                                         fan_in_fan_out=fan_in_fan_out)
            self.conv = lora.Conv2d(3, 6, 3, r=2, lora_alpha=8)
            self.plain = torch.nn.Linear(16, 16)

    torch.manual_seed(0)
    model = Toy()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # loralib starts B (and the embedding's A) at zero
                p.normal_(0, 0.1)
    return lora, model


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_loralib_matches_its_own_merge(tmp_path, fan_in_fan_out):
    """Linear, Embedding, MergedLinear (enable_lora) and ConvLoRA, against loralib's model.eval() merge."""
    lora, model = _loralib_toy(fan_in_fan_out)
    model.train()
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if "lora_" not in k}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "base" / "config.json").write_text("{}")
    torch.save(lora.lora_state_dict(model), tmp_path / "lora.pt")
    model.eval()  # loralib merges here
    reference = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}

    assert detect_format(tmp_path / "lora.pt") == "loralib"
    args = [tmp_path / "base", tmp_path / "lora.pt", tmp_path / "out", "--lora-alpha", 8, "--enable-lora", "q,v", "-q"]
    r = run_cli(*args, *(["--fan-in-fan-out"] if fan_in_fan_out else []))
    assert r.exit_code == 0, r.output
    assert assert_merged_like(tmp_path / "out", reference, base) == 4


def test_loralib_needs_alpha_and_enabled_parts(tmp_path):
    lora, model = _loralib_toy(False)
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if "lora_" not in k}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    torch.save(lora.lora_state_dict(model), tmp_path / "lora.pt")
    expect_error(run_cli(tmp_path / "base", tmp_path / "lora.pt", tmp_path / "out"), "--lora-alpha")
    expect_error(run_cli(tmp_path / "base", tmp_path / "lora.pt", tmp_path / "out", "--lora-alpha", 8),
                 "qkv: a MergedLinear with 2 enabled parts", "--enable-lora")
    expect_error(run_cli(tmp_path / "base", tmp_path / "lora.pt", tmp_path / "out", "--lora-alpha", 8,
                         "--enable-lora", "q"), "(--enable-lora gives 1 of 3)")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------- mlx

def _mlx_adapter(base, folder, params: dict, seed: int = 3, dora: bool = False):
    """Build an mlx-lm LoRA on ``base`` with mlx-lm's own code, save it as mlx_lm.lora does, and
    return mlx-lm's fused weights."""
    mx = pytest.importorskip("mlx.core", reason="mlx runs on Linux only with the mlx[cpu] build")
    pytest.importorskip("mlx_lm")
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = llama.Model(llama.ModelArgs.from_dict(json.loads((base / "config.json").read_text())))
    model.load_weights(list(mx.load(str(base / "model.safetensors")).items()))
    model.freeze()
    linear_to_lora_layers(model, 2, params, use_dora=dora)
    mx.random.seed(seed)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):  # mlx-lm starts B at zero
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.1
        if dora and hasattr(m, "m"):
            m.m = m.m * (1 + 0.05 * mx.random.normal(m.m.shape))
    folder.mkdir()
    mx.save_safetensors(str(folder / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "dora" if dora else "lora", "num_layers": 2, "lora_parameters": params}))
    fused = [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))
    return {k: torch.from_numpy(np.array(v)) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("dora", [False, True])
def test_mlx_matches_mlx_lm_fuse(tmp_path, dora):
    """mlx-lm's own LoRA layers and fuse() on the same weights (mlx's CPU build runs on Linux)."""
    build_model("llama", tmp_path / "base")
    keys = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"] + ([] if dora else ["model.embed_tokens"])
    reference = _mlx_adapter(tmp_path / "base", tmp_path / "adapter",
                             {"rank": 4, "scale": 3.0, "dropout": 0.0, "keys": keys}, dora=dora)
    assert detect_format(tmp_path / "adapter") == "mlx"
    r = run_cli(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    changed = assert_merged_like(tmp_path / "out", reference, load_tensors(tmp_path / "base"))
    assert changed == 6 + (0 if dora else 1)


def test_mlx_formula_by_hand(tmp_path):
    """Without mlx: lora_a (in × r) and lora_b (r × out) give W + scale · lora_bᵀ · lora_aᵀ, and an
    embedding W + scale · lora_a · lora_b."""
    torch.manual_seed(0)
    base = {"layer.proj.weight": torch.randn(6, 5), "embed_tokens.weight": torch.randn(9, 4), "other": torch.randn(3)}
    adapter = {"layer.proj.lora_a": torch.randn(5, 2), "layer.proj.lora_b": torch.randn(2, 6),
               "embed_tokens.lora_a": torch.randn(9, 2), "embed_tokens.lora_b": torch.randn(2, 4)}
    (tmp_path / "base").mkdir()
    (tmp_path / "adapter").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    save_file(adapter, str(tmp_path / "adapter" / "adapters.safetensors"))
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 2, "scale": 1.5}}))
    r = run_cli(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    got = load_tensors(tmp_path / "out")
    a, b = adapter["layer.proj.lora_a"].double(), adapter["layer.proj.lora_b"].double()
    want = (base["layer.proj.weight"].double() + 1.5 * b.T @ a.T).float()
    assert torch.equal(got["layer.proj.weight"], want)
    ea, eb = adapter["embed_tokens.lora_a"].double(), adapter["embed_tokens.lora_b"].double()
    assert torch.equal(got["embed_tokens.weight"], (base["embed_tokens.weight"].double() + 1.5 * ea @ eb).float())
    assert torch.equal(got["other"], base["other"])
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 2}}))
    expect_error(run_cli(tmp_path / "base", tmp_path / "adapter", tmp_path / "out2"), "lora_parameters.scale")


# --------------------------------------------------------------------------------------------- kohya

def _tiny_unet(folder):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=8, attention_head_dim=2,
        norm_num_groups=4, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet.save_pretrained(folder)
    return unet


def test_kohya_into_a_diffusers_unet_matches_peft(tmp_path):
    """A kohya file (3×3 conv LoRA included, alpha ≠ r) written from a peft LoRA on a tiny UNet;
    peft's own merge is the reference. The file's text-encoder part is left for its own folder."""
    import peft

    unet = _tiny_unet(tmp_path / "unet")
    base = load_tensors(tmp_path / "unet")
    config = peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in"])
    peft.inject_adapter_in_model(config, unet)
    kohya = {}
    convs = 0
    for name, module in unet.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            key = "lora_unet_" + name.replace(".", "_")
            kohya[f"{key}.lora_down.weight"] = module.lora_A["default"].weight.detach().clone().contiguous()
            kohya[f"{key}.lora_up.weight"] = module.lora_B["default"].weight.detach().clone().contiguous()
            kohya[f"{key}.alpha"] = torch.tensor(6.0)
            convs += kohya[f"{key}.lora_down.weight"].shape[-1] == 3
            module.merge()
    assert convs > 0
    for part, shape in (("lora_down.weight", (4, 8)), ("lora_up.weight", (8, 4)), ("alpha", ())):
        kohya[f"lora_te_text_model_encoder_layers_0_self_attn_q_proj.{part}"] = torch.ones(shape)
    save_file(kohya, str(tmp_path / "style.safetensors"))
    reference = {k.replace(".base_layer", ""): v.detach().clone() for k, v in unet.state_dict().items()
                 if "lora_" not in k}

    assert detect_format(tmp_path / "style.safetensors") == "kohya"
    r = run_cli(tmp_path / "unet", tmp_path / "style.safetensors", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "lora_te_… modules are for another component" in r.output
    assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors").is_file()
    assert assert_merged_like(tmp_path / "out", reference, base) == len(kohya) // 3 - 1
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert len(report["coverage"]["ignored"]) == 3


def test_kohya_names_no_module_of_base(tmp_path):
    _tiny_unet(tmp_path / "unet")
    save_file({"lora_te_text_model_x.lora_down.weight": torch.ones(2, 4),
               "lora_te_text_model_x.lora_up.weight": torch.ones(4, 2)}, str(tmp_path / "te.safetensors"))
    expect_error(run_cli(tmp_path / "unet", tmp_path / "te.safetensors", tmp_path / "out"),
                 "names no module of BASE", "lora_te_…: 1 modules")


# ------------------------------------------------------------------------------------ unknown formats

def test_unknown_layout_is_refused_with_what_was_found(tmp_path, models):
    save_file({"hada_w1_a": torch.ones(2, 2), "hada_w1_b": torch.ones(2, 2)}, str(tmp_path / "loha.safetensors"))
    r = run_cli(models["llama"], tmp_path / "loha.safetensors", tmp_path / "out")
    expect_error(r, "not an adapter lora-merge recognises", "holds 2 tensors (hada_w1_a", "Recognised layouts",
                 "peft:", "mlx:", "loralib:", "kohya:")
    (tmp_path / "empty").mkdir()
    expect_error(run_cli(models["llama"], tmp_path / "empty", tmp_path / "out"), "no tensor file")
    # a named format that does not fit the files says so too
    expect_error(run_cli(models["llama"], tmp_path / "loha.safetensors", tmp_path / "out", "--adapter-format", "kohya"),
                 "not a kohya LoRA tensor")
