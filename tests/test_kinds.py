"""peft's adapter kinds beyond LoRA (AdaLoRA, LoHa, LoKr, IA3, VeRA, MiSS, OFT) against peft's own merge_and_unload in float64, rounded
once; the kinds with no weight to merge, and those not merged yet, refused by name."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from helpers import bf16_factors, expect_error, load_tensors, run_cli
from test_peft_oracle import round_bf16_reference

from lora_merge import merge, unmerge, verify

LINEAR = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]

KINDS = {
    "adalora": lambda: peft.AdaLoraConfig(init_r=6, target_r=4, total_step=10, lora_alpha=8, target_modules=LINEAR,
                                          init_lora_weights=False),
    "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=LINEAR, init_weights=False),
    "loha_patterns": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=LINEAR, init_weights=False,
                                             rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3}),
    "lokr": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=LINEAR, init_weights=False),
    "lokr_low_rank": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=LINEAR, init_weights=False,
                                             decompose_both=True, decompose_factor=4),
    "ia3": lambda: peft.IA3Config(target_modules=LINEAR, feedforward_modules=["down_proj"], init_ia3_weights=False),
    "vera": lambda: peft.VeraConfig(r=8, target_modules=LINEAR, init_weights=False),
    "miss": lambda: peft.MissConfig(r=4, target_modules=LINEAR, init_weights=False),
    "miss_mini": lambda: peft.MissConfig(r=3, target_modules=LINEAR, init_weights="mini", mini_r=8),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=LINEAR, init_weights=False),
    "oft_cayley": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=LINEAR, init_weights=False,
                                         use_cayley_neumann=False),
    "oft_shared": lambda: peft.OFTConfig(r=0, oft_block_size=4, target_modules=LINEAR, init_weights=False,
                                         block_share=True, num_cayley_neumann_terms=7),
    "hra": lambda: peft.HRAConfig(r=4, target_modules=LINEAR, init_weights=False),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, target_modules=LINEAR, init_weights=False),
    "road": lambda: peft.RoadConfig(target_modules=LINEAR, init_weights=False, group_size=8),
    "road_2": lambda: peft.RoadConfig(target_modules=LINEAR, init_weights=False, group_size=4, variant="road_2"),
    "road_4": lambda: peft.RoadConfig(target_modules=LINEAR, init_weights=False, group_size=16, variant="road_4"),
    "fourierft": lambda: peft.FourierFTConfig(n_frequency=24, scaling=150.0, target_modules=LINEAR,
                                              init_weights=False, random_loc_seed=5),
}


def build_kind(base, folder, config, seed: int = 3):
    """A real peft adapter of any kind on the model in ``base``, its weights away from identity."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():  # AdaLoRA's E and MiSS's block start at zero, IA3's l and BOFT's s at one
        for name, p in pm.named_parameters():
            if p.requires_grad and any(k in name for k in ("lora_E", "ia3_l", "miss_block", "boft_s")):
                p.add_(torch.randn_like(p) * 0.3)
    pm.save_pretrained(folder)


def reference(base, adapter) -> dict[str, torch.Tensor]:
    """peft's merge in float64 (the adapter kept in float64 too)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    pm = peft.PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=False)
    fourier = {name.removeprefix("base_model.model.") + ".weight":
               module.get_base_layer().weight.detach().clone() + _fourier_delta(module)
               for name, module in pm.named_modules() if isinstance(module, peft.tuners.fourierft.FourierFTLayer)}
    merged = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return merged | fourier  # peft's own FourierFT merge is float32 (see _fourier_delta)


def _fourier_delta(layer) -> torch.Tensor:
    """FourierFT's ΔW from peft's own layer (its drawn indices, its spectrum) in complex128: peft's get_delta_weight
    builds its dense spectrum in float32 and transforms it in complex64, which is not the float64 reference."""
    spectrum = layer.fourierft_spectrum["default"].detach().to(torch.float64)
    indices = layer.indices["default"]
    dense = torch.zeros(layer.out_features, layer.in_features, dtype=torch.complex128)
    dense[indices[0], indices[1]] = spectrum.to(torch.complex128)
    delta = torch.fft.ifft2(dense).real * layer.fourierft_scaling["default"]
    return delta.T if layer.fan_in_fan_out else delta


def ulps_unit(mag: torch.Tensor) -> torch.Tensor:
    """float32's ulp at each |x|."""
    return torch.pow(2.0, torch.floor(torch.log2(mag.double().clamp(min=torch.finfo(torch.float32).tiny))) - 23)


def rounded_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype != torch.bfloat16:
        return x.to(dtype)  # float64 -> float32 rounds once
    zero = x == 0
    return torch.where(zero, x.to(dtype), round_bf16_reference(torch.where(zero, 1.0, x)))


def assert_merged_as_peft(base, adapter, out, expect_changed: int):
    ours, ref, before = load_tensors(out), reference(base, adapter), load_tensors(base)
    assert set(ours) == set(before)
    changed = 0
    for name, got in ours.items():
        assert got.dtype == before[name].dtype, name
        want = rounded_once(ref[name], got.dtype)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
        changed += not torch.equal(got, before[name])
    assert changed == expect_changed


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("base_name", ["llama", "llama_bf16"])
def test_kind_matches_peft(kind, base_name, models, tmp_path):
    base = models[base_name]
    build_kind(base, tmp_path / "adapter", KINDS[kind]())
    result = merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu", block_bytes=2048)
    assert result.stats.merged == 2 * len(LINEAR)
    assert_merged_as_peft(base, tmp_path / "adapter", tmp_path / "out", 2 * len(LINEAR))
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["checks"]["merged"]["ok"] and "correctly rounded" in report["checks"]["merged"]["summary"]
    assert report["coverage"]["kind"].lower() == kind.split("_")[0] and not report["coverage"]["left_over"]


@pytest.mark.parametrize("config", [
    lambda: peft.FourierFTConfig(n_frequency=30, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                 init_weights=False),
    lambda: peft.VeraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True, init_weights=False),
])
def test_conv1d_layers(config, models, tmp_path):
    """GPT-2's Conv1D layers store W as in × out: the delta goes in transposed (peft's fan_in_fan_out)."""
    base = models["gpt2"]
    build_kind(base, tmp_path / "adapter", config())
    result = merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    assert_merged_as_peft(base, tmp_path / "adapter", tmp_path / "out", result.stats.merged)
    assert result.stats.merged > 0


def test_ia3_scales_the_bias(models, tmp_path):
    """Outside feedforward_modules peft scales the layer's bias with l too (qwen2's attention has biases)."""
    base = models["qwen2"]
    build_kind(base, tmp_path / "adapter", peft.IA3Config(target_modules=["q_proj", "k_proj", "down_proj"],
                                                          feedforward_modules=["down_proj"], init_ia3_weights=False))
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    ours, before = load_tensors(tmp_path / "out"), load_tensors(base)
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.bias"], before["model.layers.0.self_attn.q_proj.bias"])
    assert_merged_as_peft(base, tmp_path / "adapter", tmp_path / "out", 2 * 5)


@pytest.mark.parametrize("kind", ["oft", "oft_cayley", "boft", "hra", "road", "road_4", "fourierft", "loha", "lokr",
                                  "vera", "miss", "adalora"])
def test_exact_step_on_many_elements(kind, models, tmp_path, monkeypatch):
    """The float64 bounds widened a million times: many elements are left open, and every one is decided by the
    exact step (fractions, or the cosines' intervals for FourierFT and RoAd); the result is still peft's, rounded
    once."""
    from lora_merge import kindmath, orthomath, roadmath

    for module in (kindmath, orthomath, roadmath):
        monkeypatch.setattr(module, "UNIT", 2.0**-33)
    base = models["llama"]
    build_kind(base, tmp_path / "adapter", KINDS[kind]())
    result = merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    assert result.stats.exact > 100
    assert_merged_as_peft(base, tmp_path / "adapter", tmp_path / "out", 2 * len(LINEAR))


@pytest.mark.parametrize("kind", ["loha", "lokr", "adalora", "vera", "miss", "fourierft", "ia3", "oft", "oft_cayley",
                                  "boft", "hra", "road"])
def test_the_check_finds_one_wrong_element(kind, models, tmp_path):
    """Each kind's check computes the merged value its own way: one element moved 32 steps of bfloat16 (a fifth of
    its size or more; the check admits a merge computed in float32, several steps where W and the change nearly
    cancel) fails the merged check, which names the tensor and the element."""
    from test_report import rewrite

    base = models["llama_bf16"]
    build_kind(base, tmp_path / "adapter", KINDS[kind]())
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    assert verify(tmp_path / "out", str(base), str(tmp_path / "adapter")).check("merged").ok
    name = "model.layers.1.self_attn.o_proj.weight"

    def corrupt(tensors):
        t = tensors[name]
        t[2, 3] = (t[2, 3].view(torch.int16) + 32).view(torch.bfloat16)

    rewrite(tmp_path / "out", name, corrupt)
    merged = verify(tmp_path / "out", str(base), str(tmp_path / "adapter")).check("merged")
    assert not merged.ok
    assert any(name in f and "first at [2, 3]" in f for f in merged.failures), merged.failures


def test_adalora_pruned_components(models, tmp_path):
    """AdaLoRA's budget prunes rank components by zeroing their E: the rest merge as peft merges them, and a module
    whose every component is pruned is left alone (its factors counted as ignored)."""
    from safetensors.torch import load_file, save_file

    base = models["llama"]
    build_kind(base, tmp_path / "adapter", KINDS["adalora"]())
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    for name in sorted(tensors):
        if name.endswith("lora_E"):
            tensors[name][::2] = 0  # half of every module's components
        if name.endswith("lora_E") and ".layers.0.self_attn.q_proj." in name:
            tensors[name].zero_()
    save_file(tensors, path, metadata={"format": "pt"})
    result = merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu", block_bytes=2048)
    assert result.stats.merged == 2 * len(LINEAR) - 1
    assert_merged_as_peft(base, tmp_path / "adapter", tmp_path / "out", 2 * len(LINEAR) - 1)


def test_adalora_stored_in_float64(models, tmp_path):
    """A float64 AdaLoRA: A·E would round, so each component is its own rank-one product with E in its scale; the
    merge passes its own check and is within an ulp of peft's."""
    from safetensors.torch import load_file, save_file

    base = models["llama"]
    build_kind(base, tmp_path / "adapter", KINDS["adalora"]())
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file({k: v.double() for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    result = merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    assert result.stats.merged == 2 * len(LINEAR) and result.report.ok
    ours, ref = load_tensors(tmp_path / "out"), reference(base, tmp_path / "adapter")
    for name, got in ours.items():
        unit = ulps_unit(ref[name].abs())
        assert float(((got.double() - ref[name]).abs() / unit).max()) <= 1, name


def test_road_turns_the_bias(models, tmp_path):
    """qwen2's attention has biases: peft turns them with the weight's rows."""
    base = models["qwen2"]
    build_kind(base, tmp_path / "adapter", peft.RoadConfig(target_modules=["q_proj", "k_proj", "down_proj"],
                                                           init_weights=False, group_size=4))
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu", block_bytes=1024)
    ours, before = load_tensors(tmp_path / "out"), load_tensors(base)
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.bias"], before["model.layers.0.self_attn.q_proj.bias"])
    assert_merged_as_peft(base, tmp_path / "adapter", tmp_path / "out", 2 * 5)


def test_tied_qwen3(models, tmp_path):
    base = models["qwen3_tied"]
    build_kind(base, tmp_path / "adapter", peft.LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "up_proj"],
                                                           init_weights=False))
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    assert_merged_as_peft(base, tmp_path / "adapter", tmp_path / "out", 2 * 2)


# per kind: significant bits of its values, and config changes that make many exact values ties
TIES = {"loha": (3, {"alpha": 4}), "lokr_low_rank": (3, {"alpha": 2}), "adalora": (3, {}), "miss": (3, {}),
        "oft": (1, {"num_cayley_neumann_terms": 2}), "oft_cayley": (3, {}), "hra": (2, {}), "boft": (3, {})}


@pytest.mark.parametrize("kind", sorted(TIES))
def test_ties_decided_exactly(kind, models, tmp_path):
    """Values of few significant bits and power-of-two scales: many merged values land exactly on a bfloat16
    midpoint, where the float64 value alone cannot tell (its bound holds the midpoint): each is the exact
    value's rounding, ties to even (peft's float64 merge is exact here, and rounded once by integer arithmetic).
    AdaLoRA's scale, the Cayley map and HRA divide, so their exact values are no ties: they are checked all the
    same."""
    base = models["llama_bf16"]
    build_kind(base, tmp_path / "made", KINDS[kind]())
    bits, changes = TIES[kind]
    adapter = bf16_factors(tmp_path / "made", tmp_path / "adapter", bits=bits)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | changes))
    result = merge(str(base), str(adapter), tmp_path / "out", device="cpu")
    assert_merged_as_peft(base, adapter, tmp_path / "out", 2 * len(LINEAR))
    if kind not in ("adalora", "oft_cayley", "hra", "boft"):
        assert result.stats.exact > 0


def test_verify_and_unmerge_an_additive_kind(models, tmp_path):
    base = models["llama"]
    build_kind(base, tmp_path / "adapter", KINDS["loha"]())
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    assert verify(tmp_path / "out", str(base), str(tmp_path / "adapter")).ok
    result = unmerge(str(tmp_path / "out"), str(tmp_path / "adapter"), tmp_path / "back", original=str(base))
    assert result.report.ok
    back, before, merged = load_tensors(tmp_path / "back"), load_tensors(base), load_tensors(tmp_path / "out")
    # one rounding each way: within an ulp of the larger of |W| and |W + ΔW|, as for LoRA
    for name in before:
        unit = ulps_unit(torch.maximum(before[name].abs(), merged[name].abs()))
        assert float(((back[name].double() - before[name].double()).abs() / unit).max()) <= 1, name


def test_ia3_not_weighted(models, tmp_path):
    base = models["llama"]
    build_kind(base, tmp_path / "adapter", KINDS["ia3"]())
    r = run_cli(str(base), "--adapter", f"{tmp_path / 'adapter'}:0.5", str(tmp_path / "out"))
    expect_error(r, "ia3", "weighted 0.5", "applies first")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("peft_type, words", [
    ("PROMPT_TUNING", ["PROMPT_TUNING", "no weight to merge"]),
    ("PREFIX_TUNING", ["PREFIX_TUNING", "no weight to merge"]),
    ("XLORA", ["XLORA", "per token"]),
    ("LILY", ["LILY", "peft does not define a merge"]),
    ("SHADOW", ["SHADOW", "peft does not define a merge"]),
    ("VBLORA", ["VBLORA", "does not merge yet", "LOHA"]),
])
def test_kinds_refused_by_name(peft_type, words, models, tmp_path):
    base = models["llama"]
    build_kind(base, tmp_path / "adapter", KINDS["loha"]())
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg | {"peft_type": peft_type}))
    r = run_cli(str(base), str(tmp_path / "adapter"), str(tmp_path / "out"))
    expect_error(r, *words)
    assert not (tmp_path / "out").exists()


def test_dry_run_names_the_kind(models, tmp_path):
    base = models["llama"]
    build_kind(base, tmp_path / "adapter", KINDS["lokr"]())
    r = run_cli(str(base), str(tmp_path / "adapter"), str(tmp_path / "out"), "--dry-run")
    assert r.exit_code == 0, r.output
    assert "lokr(ff, s=2)" in r.output


def test_vera_without_its_projections_refused(models, tmp_path):
    base = models["llama"]
    build_kind(base, tmp_path / "adapter", peft.VeraConfig(r=8, target_modules=LINEAR, init_weights=False,
                                                           save_projection=False))
    r = run_cli(str(base), str(tmp_path / "adapter"), str(tmp_path / "out"))
    expect_error(r, "vera_A", "save_projection is false", "save_projection=True")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config, words", [
    (lambda: peft.MissConfig(r=4, target_modules=["q_proj"], init_weights="bat"), ["bat", "not merged yet"]),
    (lambda: peft.HRAConfig(r=2, target_modules=["q_proj"], init_weights=False, apply_GS=True),
     ["apply_GS", "not merged yet"]),
])
def test_forms_not_merged_yet(config, words, models, tmp_path):
    base = models["llama"]
    build_kind(base, tmp_path / "adapter", config())
    r = run_cli(str(base), str(tmp_path / "adapter"), str(tmp_path / "out"))
    expect_error(r, *words)
    assert not (tmp_path / "out").exists()


def test_boft_with_several_butterfly_factors_refused(models, tmp_path):
    """peft makes one butterfly factor unless its CUDA extension builds: a file with two, as that extension makes
    them (boft_R stacked along its first axis), is refused by name."""
    from safetensors.torch import load_file, save_file

    base = models["llama"]
    build_kind(base, tmp_path / "adapter", peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj"],
                                                           init_weights=False))
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    weights = {k: torch.cat([v, v]) if k.endswith("boft_R") else v for k, v in weights.items()}
    save_file(weights, tmp_path / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    r = run_cli(str(base), str(tmp_path / "adapter"), str(tmp_path / "out"))
    expect_error(r, "2 butterfly factors", "not merged yet")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("within", [True, False])
def test_coft(within, models, tmp_path):
    """COFT keeps each block within eps of zero: where every saved block is, its projection changes nothing and the
    merge is peft's; a block outside (its projection a square root away) is refused by name."""
    from safetensors.torch import load_file, save_file

    base = models["llama"]
    build_kind(base, tmp_path / "adapter", peft.OFTConfig(r=0, oft_block_size=8, target_modules=LINEAR,
                                                          init_weights=False, coft=True, eps=1e-2))
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for k, v in weights.items():  # ‖Q‖ = √2‖q‖, below eps / √blocks, or well past it
        weights[k] = v / (v.norm(dim=1, keepdim=True) * 2 * (v.shape[0] ** 0.5)) * (1e-2 if within else 1.0)
    save_file(weights, tmp_path / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    if within:
        merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
        assert_merged_as_peft(base, tmp_path / "adapter", tmp_path / "out", 2 * len(LINEAR))
    else:
        r = run_cli(str(base), str(tmp_path / "adapter"), str(tmp_path / "out"))
        expect_error(r, "COFT", "not round exactly yet")
        assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory):
    """A mixture of experts (bf16, sharded): peft's kinds other than LoRA adapt nn.Linear layers only, which here are
    the attention, the shared expert and its gate (the routed experts are one fused parameter in memory, stored
    one file tensor per expert: the placement goes through transformers' tables)."""
    from architectures import tiny_config

    folder = tmp_path_factory.mktemp("qwen2_moe") / "base"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen2_moe"))
    with torch.no_grad():  # biases away from zero: IA3 scales q_proj's
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="40KB")
    return folder


MOE_TARGETS = ["q_proj", "gate_proj", "down_proj", "shared_expert_gate"]


@pytest.mark.parametrize("kind", ["loha", "lokr", "vera", "oft", "ia3", "miss", "hra", "fourierft", "boft", "road"])
def test_kinds_on_a_mixture_of_experts(kind, qwen2_moe, tmp_path):
    from test_layouts import peft_merge

    config = KINDS[kind]()
    config.target_modules = set(MOE_TARGETS) - ({"shared_expert_gate"} if kind == "road" else set())  # 1 row
    if kind == "ia3":
        config.feedforward_modules = {"down_proj"}
    build_kind(qwen2_moe, tmp_path / "adapter", config)
    result = merge(str(qwen2_moe), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    reference = peft_merge(qwen2_moe, tmp_path / "adapter", tmp_path / "reference")
    ours, before = load_tensors(tmp_path / "out"), load_tensors(qwen2_moe)
    assert set(ours) == set(reference)
    changed = 0
    for name, got in ours.items():
        assert torch.equal(got.view(torch.uint8), rounded_once(reference[name], got.dtype).view(torch.uint8)), name
        changed += not torch.equal(got, before[name])
    assert changed == result.stats.merged > 0
    assert any("shared_expert." in name and not torch.equal(ours[name], before[name]) for name in ours)


@pytest.mark.parametrize("kind", ["loha", "lokr", "vera", "oft", "hra", "ia3", "fourierft"])
def test_a_kind_then_lora(kind, models, tmp_path):
    """Two adapters of different kinds in one run, in the order given: a multiplying kind first (W' = f(W) + ΔW),
    an additive one summed with LoRA. The reference: peft's float64 merge of the kind, plus the LoRA delta from
    peft's float64 merge of the LoRA adapter; rounded once."""
    from helpers import build_adapter

    base = models["llama_bf16"]
    build_kind(base, tmp_path / "kind", KINDS[kind]())
    build_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "k_proj"])
    result = merge(str(base), [str(tmp_path / "kind"), str(tmp_path / "lora")], tmp_path / "out", device="cpu")
    with_kind, with_lora = reference(base, tmp_path / "kind"), reference(base, tmp_path / "lora")
    before = load_tensors(base)
    ours = load_tensors(tmp_path / "out")
    for name, got in ours.items():
        want = with_kind[name] + (with_lora[name] - before[name].to(torch.float64))
        assert torch.equal(got.view(torch.uint8), rounded_once(want, got.dtype).view(torch.uint8)), name
    assert result.stats.merged == 2 * (len(LINEAR) + 1)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    if kind in ("oft", "hra", "ia3"):
        assert any("multiplies" in note and "first" in note for note in report["notes"])


def test_a_multiplying_kind_after_another_refused(models, tmp_path):
    from helpers import build_adapter

    base = models["llama"]
    build_kind(base, tmp_path / "oft", KINDS["oft"]())
    build_adapter(base, tmp_path / "lora", r=4, lora_alpha=8, target_modules=["q_proj"])
    r = run_cli(str(base), "--adapter", str(tmp_path / "lora"), "--adapter", str(tmp_path / "oft"), str(tmp_path / "out"))
    expect_error(r, "q_proj", "oft", "after adapter 1", "list it before the others")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["oft", "boft", "hra", "road"])
def test_unmerge_refuses_a_transforming_kind(kind, models, tmp_path):
    base = models["llama"]
    build_kind(base, tmp_path / "adapter", KINDS[kind]())
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    r = run_cli("unmerge", str(tmp_path / "out"), str(tmp_path / "adapter"), str(tmp_path / "back"))
    expect_error(r, "transformed W", "not done yet", "keep the base model")
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("base_name", ["llama", "llama_bf16"])
def test_unmerge_divides_ia3_back_out(base_name, models, tmp_path):
    """IA3 is taken back out by dividing by l, rounded once from the exact quotient: within an ulp of the original
    (one rounding each way), the report's check and round trip pass, and some elements are certainly the
    original."""
    base = models[base_name]
    build_kind(base, tmp_path / "adapter", KINDS["ia3"]())
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    result = unmerge(str(tmp_path / "out"), str(tmp_path / "adapter"), tmp_path / "back", original=str(base))
    assert result.report.ok, result.report.failed_checks
    back, before, merged = load_tensors(tmp_path / "back"), load_tensors(base), load_tensors(tmp_path / "out")
    changed = 0
    for name in before:
        unit = ulps_unit(torch.maximum(before[name].abs(), merged[name].abs()))
        if before[name].dtype == torch.bfloat16:
            unit = unit * 2.0**16
        assert float(((back[name].double() - before[name].double()).abs() / unit).max()) <= 1, name
        changed += not torch.equal(merged[name], before[name])
        if not torch.equal(merged[name], before[name]):  # the quotient, rounded once
            factor = next(v for k, v in load_tensors(tmp_path / "adapter").items()
                          if k.startswith("base_model.model." + name.rsplit(".", 1)[0] + "."))
            want = merged[name].double() / (factor.double().reshape(-1, 1) if factor.numel() == merged[name].shape[0]
                                             else factor.double().reshape(1, -1))
            assert torch.equal(back[name].view(torch.uint8), rounded_once(want, back[name].dtype).view(torch.uint8))
    assert changed == 2 * len(LINEAR)
    data = json.loads((tmp_path / "back" / "merge_report.json").read_text())
    assert data["checks"]["round trip"]["ok"]
    assert "certainly the original" in data["checks"]["round trip"]["summary"]
    assert "W ⊘ l correctly rounded" in data["checks"]["merged"]["summary"]


def test_unmerge_refuses_ia3_with_a_zero_factor(models, tmp_path):
    from safetensors.torch import load_file, save_file

    base = models["llama"]
    build_kind(base, tmp_path / "adapter", KINDS["ia3"]())
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name].view(-1)[1] = 0
    save_file(tensors, path, metadata={"format": "pt"})
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    r = run_cli("unmerge", str(tmp_path / "out"), str(tmp_path / "adapter"), str(tmp_path / "back"))
    expect_error(r, "factor of zero", "keep the base model")
    assert not (tmp_path / "back").exists()
