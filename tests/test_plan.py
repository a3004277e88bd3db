"""make_plan's jobs, each from headers alone (nothing is merged here): refusing what cannot be asked together,
resolving targets, untying embeddings, gathering problems, laying out shards and rewriting the config; and the plan
as a frozen value."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import build_adapter

from lora_merge.errors import PlanError, QuantizationError
from lora_merge.inputs import load_inputs
from lora_merge.plan import (
    make_plan,
    raise_problems,
    refuse_combinations,
    resolve_targets,
    rewrite_config,
    untie_embeddings,
)
from lora_merge.quantize import Quantization


@pytest.fixture(scope="module")
def tied(models, tmp_path_factory):
    """Qwen3 with tied embeddings, and an adapter on its input embedding and attention."""
    folder = tmp_path_factory.mktemp("plan") / "adapter"
    build_adapter(models["qwen3_tied"], folder, r=2, target_modules=["embed_tokens", "q_proj"])
    return load_inputs(str(models["qwen3_tied"]), [(str(folder), 1.0)], None, None)[:2]


def test_refuse_combinations_says_what_cannot_be_asked_together(tied):
    base, _ = tied
    assert refuse_combinations(base, None, None) is False  # a float BASE: nothing kept in a quantized format
    with pytest.raises(QuantizationError, match="--quantize fp8 and --dtype bfloat16 both say"):
        refuse_combinations(base, "bfloat16", Quantization("fp8"))


def test_resolve_targets_fits_each_target_on_its_tensor(tied):
    base, adapter = tied
    found = resolve_targets(base, adapter, keep=False)
    assert not found.problems
    assert found.tie_source == "model.embed_tokens.weight"
    assert set(found.resolved) == set(adapter.targets)
    for name, (op, info) in found.resolved.items():
        assert info is base.tensors[name] and op.deltas and op is not adapter.targets[name]  # fitted: a copy


def test_untie_embeddings_adds_the_original_output_layer(tied):
    base, adapter = tied
    found = resolve_targets(base, adapter, keep=False)
    untie_embeddings(base, found, keep=False, out_dtype=None)
    assert found.untie and list(found.added) == ["lm_head.weight"]
    head = found.added["lm_head.weight"]
    assert head.base is base.tensors["model.embed_tokens.weight"] and head.ops is None
    assert any("keeps the original and the tie is removed" in n for n in found.notes)


def test_problems_are_raised_all_at_once_with_their_kinds():
    problems = ["a.weight: the adapter's a has no tensor 'a.weight' in BASE",
                "b.weight: the adapter's b has no tensor 'b.weight' in BASE", "c.weight: lora_A has shape [1, 2]"]
    raise_problems([])  # nothing to say
    with pytest.raises(PlanError, match=r"3 problems: 2 targets BASE does not have, 1 that do not fit") as e:
        raise_problems(problems)
    assert e.value.problems == problems


def test_a_target_base_lacks_is_a_problem_not_an_exception(tied):
    base, adapter = tied
    ops = dict(adapter.targets)
    name = "model.layers.0.self_attn.q_proj.weight"
    ops["model.layers.9.self_attn.q_proj.weight"] = dataclasses.replace(ops[name], name="model.layers.9.x")
    found = resolve_targets(base, dataclasses.replace(adapter, targets=ops), keep=False)
    assert found.problems == ["model.layers.9.self_attn.q_proj.weight: the adapter's "
                              f"{ops[name].module} has no tensor 'model.layers.9.self_attn.q_proj.weight' in BASE"]


def test_the_layout_keeps_base_files_and_order_and_the_config_says_what_changed(tied):
    base, adapter = tied
    plan = make_plan(base, adapter, dtype="bfloat16")
    assert [s.name for s in plan.shards] == [h.path.name for h in base.shards]
    for shard, header in zip(plan.shards, base.shards, strict=True):
        stored = [n for n, _, _ in shard.stored]
        assert stored[:len(header.tensors)] == list(header.tensors)  # BASE's own, in file order, then the added
    embed = next(s for s in plan.shards if any(e.name == "model.embed_tokens.weight" for e in s.entries))
    assert embed.entries[-1].name == "lm_head.weight"  # the untied copy, in its source's shard
    assert {e.name for e in plan.entries if e.is_merge} == set(adapter.targets)
    assert all(e.dtype == "BF16" for e in plan.entries)
    found = resolve_targets(base, adapter, keep=False)
    untie_embeddings(base, found, keep=False, out_dtype="BF16")
    config, changes = rewrite_config(base, list(plan.shards), "BF16", found, None)
    assert config["tie_word_embeddings"] is False and base.config["tie_word_embeddings"] is True
    assert any(c.startswith("tie_word_embeddings: True -> False") for c in changes)
    assert any(c.startswith("torch_dtype: ") or c.startswith("dtype: ") for c in changes)


def test_the_plan_is_a_frozen_value(tied):
    base, adapter = tied
    plan = make_plan(base, adapter)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.role = "MERGED"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.entries[0].note = "x"
    noted = plan.with_notes("one more", "")
    assert noted.notes == (*plan.notes, "one more") and "one more" not in plan.notes
    assert make_plan(base, adapter, role="MERGED").formula == "W − s·B·A"
