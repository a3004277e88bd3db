"""Tied embeddings and resized vocabularies: the merged model computes what the unmerged adapter computes."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    build_adapter,
    build_model,
    forward_logits,
    load_tensors,
    unmerged_logits,
)

from lora_merge import merge


@pytest.mark.parametrize("targets,kwargs", [
    (["lm_head", "q_proj"], {}),
    (["embed_tokens", "v_proj"], {}),
    (["q_proj"], {"modules_to_save": ["embed_tokens"]}),
])
def test_tied_embeddings_are_untied_when_changed(models, tmp_path, targets, kwargs):
    base = models["qwen3_tied"]
    build_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=targets, **kwargs)
    result = merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    base_t, ours = load_tensors(base), load_tensors(tmp_path / "out")
    assert "lm_head.weight" not in base_t and "lm_head.weight" in ours
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert any("tie_word_embeddings" in c for c in result.plan.config_changes)
    emb = "model.embed_tokens.weight"
    if targets[0] == "lm_head":  # input embeddings unchanged, output merged
        assert torch.equal(ours[emb], base_t[emb])
        assert not torch.equal(ours["lm_head.weight"], base_t[emb])
    else:  # input embeddings changed, the output layer keeps the original
        assert not torch.equal(ours[emb], base_t[emb])
        assert torch.equal(ours["lm_head.weight"], base_t[emb])
    torch.testing.assert_close(forward_logits(tmp_path / "out"), unmerged_logits(base, tmp_path / "adapter"),
                               rtol=1e-4, atol=1e-5)


def test_untouched_tied_model_stays_tied(models, tmp_path):
    base = models["qwen3_tied"]
    build_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    assert "lm_head.weight" not in load_tensors(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True


def test_trainable_tokens_on_tied_model(models, tmp_path):
    base = models["qwen3_tied"]
    build_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj"], trainable_token_indices=[2, 50])
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    torch.testing.assert_close(forward_logits(tmp_path / "out"), unmerged_logits(base, tmp_path / "adapter"),
                               rtol=1e-4, atol=1e-5)


def test_resized_vocabulary_follows_into_config(tmp_path):
    base = tmp_path / "base"
    build_model("llama", base)
    (tmp_path / "adapter").mkdir()
    build_adapter(base, tmp_path / "adapter", resize_to=104, r=4, target_modules=["q_proj"],
                  modules_to_save=["embed_tokens", "lm_head"])
    (tmp_path / "adapter" / "tokenizer.json").write_text('{"adapter": true}')
    result = merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    ours = load_tensors(tmp_path / "out")
    assert ours["model.embed_tokens.weight"].shape[0] == 104
    assert ours["lm_head.weight"].shape[0] == 104
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 104
    assert any("vocab_size" in c for c in result.plan.config_changes)
    # new tokens need the adapter's tokenizer
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text()) == {"adapter": True}
    torch.testing.assert_close(forward_logits(tmp_path / "out"),
                               unmerged_logits(base, tmp_path / "adapter", resize_to=104), rtol=1e-4, atol=1e-5)
