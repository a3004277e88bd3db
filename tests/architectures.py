"""Tiny configs for transformers' architectures: each family's own config class, shrunk to a few thousand
parameters so that a model is built, saved and merged in well under a second."""

from __future__ import annotations

import transformers

# sizes every config that has the attribute gets; families with other needs override below
SMALL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, vocab_size=128, max_position_embeddings=128, moe_intermediate_size=16,
    shared_expert_intermediate_size=16, num_experts=4, num_local_experts=4, n_routed_experts=4,
    num_experts_per_tok=2, n_shared_experts=1, max_window_layers=2, first_k_dense_replace=1, n_group=1,
    topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
    decoder_sparse_step=1, depth=2, embed_dim=32, num_heads=4, out_hidden_size=32, patch_size=4, image_size=16,
    spatial_merge_size=2, temporal_patch_size=2, projection_dim=32, text_hidden_size=32, mm_tokens_per_image=4,
    image_seq_length=4, num_channels=3, deepstack_visual_indexes=[0], n_embd=32, n_layer=2, n_head=4,
    n_positions=128, num_key_value_groups=2,
)
OVERRIDES: dict[str, dict] = {
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2, ffn_hidden_size=64),
    "inkling2_text": dict(swa_head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, unpadded_vocab_size=120),
    "gpt_neox": dict(rotary_pct=1.0),
    "phi": dict(partial_rotary_factor=1.0),
    "lfm2": dict(layer_types=["conv", "full_attention"], full_attn_idxs=[1], block_ff_dim=64),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], mlp_only_layers=[]),
    "gemma3_text": dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    "gemma2": dict(sliding_window=16),
    "mllama": dict(cross_attention_layers=[1]),
    "llama4_text": dict(interleave_moe_layer_step=1, no_rope_layers=[1, 1], moe_layers=[0, 1]),
}
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=4, depth=2, embed_dim=32, num_heads=4, hidden_act=None, out_hidden_size=32,
              intermediate_layers_indices=[0], num_global_layers=1, vision_output_dim=32, projection_dim=32,
              deepstack_visual_indexes=[0])


def _shrink(cfg, sizes: dict) -> None:
    for key, value in sizes.items():
        if value is not None and hasattr(cfg, key) and not isinstance(getattr(cfg, key), transformers.PretrainedConfig):
            try:
                setattr(cfg, key, value)
            except AttributeError:  # a property computed from the others (falcon's head_dim)
                pass
    pad, vocab = getattr(cfg, "pad_token_id", None), getattr(cfg, "vocab_size", None)
    if isinstance(pad, int) and isinstance(vocab, int) and pad >= vocab:
        cfg.pad_token_id = vocab - 1


def tiny_config(model_type: str):
    """``model_type``'s own config with tiny sizes (text and vision parts alike)."""
    cfg = transformers.AutoConfig.for_model(model_type)
    _shrink(cfg, SMALL | OVERRIDES.get(model_type, {}))
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and len(layer_types) != getattr(cfg, "num_hidden_layers", len(layer_types)):
        cfg.layer_types = (list(layer_types) * 2)[: cfg.num_hidden_layers]
    text = getattr(cfg, "text_config", None)
    if isinstance(text, transformers.PretrainedConfig):
        _shrink(text, SMALL | OVERRIDES.get(text.model_type, {}))
        lt = getattr(text, "layer_types", None)
        if lt is not None and len(lt) != text.num_hidden_layers:
            text.layer_types = (list(lt) * 2)[: text.num_hidden_layers]
    vision = getattr(cfg, "vision_config", None)
    if isinstance(vision, transformers.PretrainedConfig):
        _shrink(vision, VISION)
    return cfg


# (model type, auto class): the families checked, with the layouts they stand for
CAUSAL = "AutoModelForCausalLM"
VISION_TEXT = "AutoModelForImageTextToText"
DENSE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "gpt2", "gpt_neox",
         "falcon", "olmo2", "granite", "cohere", "starcoder2", "smollm3", "glm4", "apertus", "seed_oss", "lfm2"]
# experts fused in memory: one tensor per expert on disk (and Mixtral's w1/w2/w3), or fused on disk too
MOE = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "ernie4_5_moe", "qwen3_next", "granitemoe",
       "gpt_oss", "llama4_text"]
# prefixes renamed between memory and disk (and qwen3_vl, stored as in memory)
VLM = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "gemma3", "mistral3", "paligemma", "aya_vision", "mllama"]
# conversions that cut a fused on-disk tensor (Chunk) or interleave halves (Interleave)
OTHER = ["hrm_text", "inkling2_text"]
EXPERT_PARAMETERS = {  # the expert parameters a second adapter targets with target_parameters
    "qwen3_moe": ["gate_up_proj", "down_proj"], "qwen2_moe": ["gate_up_proj", "down_proj"],
    "mixtral": ["gate_up_proj", "down_proj"], "olmoe": ["gate_up_proj", "down_proj"],
    "deepseek_v3": ["gate_up_proj", "down_proj"], "ernie4_5_moe": ["gate_up_proj", "down_proj"],
    "qwen3_next": ["gate_up_proj", "down_proj"], "granitemoe": ["experts.gate_up_proj", "experts.down_proj"],
    "gpt_oss": ["down_proj", "gate_up_proj"], "llama4_text": ["experts.gate_up_proj", "experts.down_proj"],
}


def auto_class(model_type: str) -> str:
    return VISION_TEXT if model_type in VLM else CAUSAL
