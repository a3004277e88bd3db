"""Every family of architectures: adapters named for the model in memory, merged into the checkpoint on disk.

Each case builds a tiny model from the family's own config (bfloat16, sharded, saved by transformers), a
peft adapter on every linear layer (and for mixtures of experts, a second one on the expert parameters),
and compares lora-merge's output with peft's own merge done in float64 and saved by ``save_pretrained``,
which writes the layout on disk: the same tensor names, and every element the correctly rounded value.
"""

from __future__ import annotations

import pytest
import torch
from architectures import (
    DENSE,
    EXPERT_PARAMETERS,
    MOE,
    OTHER,
    VLM,
    auto_class,
    tiny_config,
)
from helpers import load_tensors, peft, transformers, ulps

from lora_merge import merge

CASES = [(t, "all-linear") for t in DENSE + MOE + VLM + OTHER] + [(t, "experts") for t in MOE]
# an all-linear adapter names tensors that the files hold under other names or layouts: it is placed through
# transformers' conversion tables (peft's all-linear reaches the experts of some families only)
MAPPED = {"qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "ernie4_5_moe", "qwen3_next", "qwen2_vl", "qwen2_5_vl",
          "llava", "gemma3", "mistral3", "paligemma", "aya_vision", "mllama", "hrm_text", "inkling2_text"}
FUSED_ON_DISK = {"gpt_oss", "llama4_text"}  # experts stored as in memory: an experts adapter matches by name


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """One tiny checkpoint per family, built on first use: model type -> folder."""
    root, made = tmp_path_factory.mktemp("families"), {}

    def get(model_type: str):
        if model_type not in made:
            torch.manual_seed(0)
            try:  # transformers' own work, before lora-merge is involved
                model = getattr(transformers, auto_class(model_type)).from_config(tiny_config(model_type))
                model.to(torch.bfloat16).save_pretrained(root / model_type, max_shard_size="40KB")
            except Exception as e:  # noqa: BLE001 - whatever the family's own code raises
                made[model_type] = f"transformers {transformers.__version__} cannot build or save a tiny " \
                                   f"{model_type}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            else:
                made[model_type] = root / model_type
        if isinstance(made[model_type], str):
            pytest.skip(made[model_type])
        return made[model_type]

    return get


def adapter_config(model_type: str, kind: str):
    if kind == "experts":
        return peft.LoraConfig(r=3, lora_alpha=5, target_modules=[], target_parameters=EXPERT_PARAMETERS[model_type],
                               init_lora_weights=False)
    return peft.LoraConfig(r=2, lora_alpha=6, target_modules="all-linear", init_lora_weights=False)


def load(model_type: str, folder, dtype):
    return getattr(transformers, auto_class(model_type)).from_pretrained(folder, dtype=dtype)


@pytest.mark.parametrize("model_type,kind", CASES, ids=[f"{t}-{k}" for t, k in CASES])
def test_merges_like_peft(model_type, kind, bases, tmp_path):
    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} does not know {model_type}")
    base = bases(model_type)
    torch.manual_seed(1)
    peft.get_peft_model(load(model_type, base, torch.float32), adapter_config(model_type, kind)).save_pretrained(
        tmp_path / "adapter")
    result = merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    assert result.report.ok
    adapter = result.plan.adapter
    expected = model_type in MAPPED if kind == "all-linear" else model_type not in FUSED_ON_DISK
    assert bool(adapter.mapped) == expected
    coverage = result.report.details["coverage"]
    assert coverage["left_over"] == [] and coverage["through_mapping"] == len(
        [k for k, v in adapter.mapped.items() if v != [k]])

    reference = load(model_type, base, torch.float64)
    merged = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter", autocast_adapter_dtype=False)
    merged.merge_and_unload().save_pretrained(tmp_path / "peft")
    ours, theirs, before = load_tensors(tmp_path / "out"), load_tensors(tmp_path / "peft"), load_tensors(base)
    assert set(ours) == set(theirs) == set(before)
    changed = 0
    for name, got in ours.items():
        assert got.shape == theirs[name].shape and got.dtype == before[name].dtype, name
        # the correctly rounded value of peft's float64 merge; a tensor the model keeps in float32 (a router)
        # has a float32 merge there, a hair off the exact value, far below half a bfloat16 ulp
        error = ulps(got, theirs[name], got.dtype).max()
        assert error <= (0.5 if theirs[name].dtype == torch.float64 else 0.51), (name, float(error))
        changed += not torch.equal(got, before[name])
    assert changed == result.stats.merged > 0
