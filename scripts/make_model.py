"""Generate a bf16 base with real tensor names and shapes and random weights, and a PEFT adapter.

    python scripts/make_model.py 0.6b DIR [--rank 16] [--factors bfloat16] [--delta large] [--shards 3] [--device cuda]

Shapes: Qwen3-0.6B and Qwen3-1.7B (tied embeddings), Llama-3-8B (untied). Writes DIR/base (sharded
safetensors, index, config.json) and DIR/adapter (LoRA on every linear layer of the decoder, its factors stored
in ``--factors``: float32, or bfloat16 as peft saves an adapter trained on a bf16 model; ``--delta``: a small or a
large change, see ``make_adapter``). Only torch and safetensors are needed; one shard is in memory at a time.
``--device cuda`` draws the random numbers on a GPU (an 8B base in seconds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "0.6b": dict(arch="qwen3", hidden=1024, inter=3072, layers=28, heads=16, kv=8, head_dim=128, vocab=151936),
    "1.7b": dict(arch="qwen3", hidden=2048, inter=6144, layers=28, heads=16, kv=8, head_dim=128, vocab=151936),
    "8b": dict(arch="llama", hidden=4096, inter=14336, layers=32, heads=32, kv=8, head_dim=128, vocab=128256),
}
ARCH = {  # model type, class, tied embeddings, per-head q/k norms
    "qwen3": ("qwen3", "Qwen3ForCausalLM", True, True),
    "llama": ("llama", "LlamaForCausalLM", False, False),
}
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tensor_shapes(c: dict):
    h, hd = c["hidden"], c["head_dim"]
    _, _, tied, qk_norm = ARCH[c.get("arch", "qwen3")]
    yield "model.embed_tokens.weight", (c["vocab"], h)
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (c["heads"] * hd, h)
        yield p + "self_attn.k_proj.weight", (c["kv"] * hd, h)
        yield p + "self_attn.v_proj.weight", (c["kv"] * hd, h)
        yield p + "self_attn.o_proj.weight", (h, c["heads"] * hd)
        if qk_norm:
            yield p + "self_attn.q_norm.weight", (hd,)
            yield p + "self_attn.k_norm.weight", (hd,)
        yield p + "mlp.gate_proj.weight", (c["inter"], h)
        yield p + "mlp.up_proj.weight", (c["inter"], h)
        yield p + "mlp.down_proj.weight", (h, c["inter"])
    yield "model.norm.weight", (h,)
    if not tied:
        yield "lm_head.weight", (c["vocab"], h)


FACTORS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DELTAS = ("small", "large")


def make(shape: str | dict, folder: Path, rank: int = 16, shards: int = 3, seed: int = 0, device: str = "cpu",
         factors: str = "float32", delta: str = "small") -> None:
    """DIR/base and DIR/adapter."""
    make_base(shape, folder / "base", shards, seed, device)
    make_adapter(shape, folder / "adapter", folder / "base", rank, seed + 1, device, factors, delta)


def make_base(shape: str | dict, base: Path, shards: int = 3, seed: int = 0, device: str = "cpu") -> None:
    c = SHAPES[shape] if isinstance(shape, str) else shape
    model_type, architecture, tied, _ = ARCH[c.get("arch", "qwen3")]
    g = torch.Generator(device).manual_seed(seed)
    base.mkdir(parents=True, exist_ok=True)
    items = list(tensor_shapes(c))
    total = sum(2 * torch.Size(s).numel() for _, s in items)
    per_shard = total / shards
    weight_map, current, size, index = {}, {}, 0, 1

    def flush():
        nonlocal current, size, index
        if current:
            name = f"model-{index:05d}-of-{shards:05d}.safetensors"
            save_file(current, base / name, metadata={"format": "pt"})
            weight_map.update({n: name for n in current})
            current, size, index = {}, 0, index + 1

    for name, s in items:
        t = (torch.randn(s, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()
        current[name] = t
        size += t.numel() * 2
        if size >= per_shard and index < shards:
            flush()
    flush()
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (base / "config.json").write_text(json.dumps({
        "architectures": [architecture], "model_type": model_type, "hidden_size": c["hidden"],
        "intermediate_size": c["inter"], "num_hidden_layers": c["layers"], "num_attention_heads": c["heads"],
        "num_key_value_heads": c["kv"], "head_dim": c["head_dim"], "vocab_size": c["vocab"],
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
        "tie_word_embeddings": tied, "torch_dtype": "bfloat16", "hidden_act": "silu",
    }, indent=2))
    (base / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6}))


def make_adapter(shape: str | dict, adapter: Path, base: Path, rank: int = 16, seed: int = 1, device: str = "cpu",
                 factors: str = "float32", delta: str = "small") -> None:
    """A LoRA adapter on every linear layer, alpha = 2r. ``delta``: small, normal factors of 0.01 (a change of about
    a tenth of W's size); large, the uniform factors torch gives a fresh nn.Linear, as peft leaves them with
    init_lora_weights=False (a change larger than W). ``factors``: their stored dtype."""
    c = SHAPES[shape] if isinstance(shape, str) else shape
    g = torch.Generator(device).manual_seed(seed)
    adapter.mkdir(parents=True, exist_ok=True)
    lora = {}
    for name, s in tensor_shapes(c):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in LINEAR:
            out, inn = s
            for part, (rows, cols) in (("lora_A", (rank, inn)), ("lora_B", (out, rank))):
                if delta == "small":
                    drawn = torch.randn((rows, cols), generator=g, device=device) * 0.01
                else:  # kaiming_uniform_(a=sqrt(5)): bound 1 / sqrt(fan_in)
                    drawn = (torch.rand((rows, cols), generator=g, device=device) * 2 - 1) / cols**0.5
                lora[f"base_model.model.{module}.{part}.weight"] = drawn.to(FACTORS[factors]).cpu()
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": LINEAR, "bias": "none",
        "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
    }, indent=2))


# peft configs of the other adapter kinds, every linear layer, for the kinds' benchmark (make_kind_adapter)
KIND_CONFIGS = {
    "loha": ("LoHaConfig", dict(r=8, alpha=16)),
    "lokr": ("LoKrConfig", dict(r=8, alpha=16)),
    "adalora": ("AdaLoraConfig", dict(init_r=16, target_r=8, total_step=10, lora_alpha=32)),
    "vera": ("VeraConfig", dict(r=256)),
    "miss": ("MissConfig", dict(r=64)),
    "fourierft": ("FourierFTConfig", dict(n_frequency=1000)),
    "ia3": ("IA3Config", dict(feedforward_modules=["down_proj"])),
    "oft": ("OFTConfig", dict(r=0, oft_block_size=32)),
    "boft": ("BOFTConfig", dict(boft_block_size=8)),
    "hra": ("HRAConfig", dict(r=8)),
    "road": ("RoadConfig", dict(group_size=64)),
}


def make_kind_adapter(kind: str, adapter: Path, base: Path, seed: int = 1) -> None:
    """A peft adapter of ``kind`` on every linear layer of the model in ``base`` (loaded whole, so it needs
    transformers and peft), its weights peft's own random init (``init_weights=False``) scaled by 0.1 where that
    init is the identity's neighbourhood, and the values that start at zero or one moved."""
    import peft
    import transformers

    name, kwargs = KIND_CONFIGS[kind]
    init = {"ia3": {"init_ia3_weights": False}, "adalora": {"init_lora_weights": False}}.get(kind, {"init_weights": False})
    config = getattr(peft, name)(target_modules=LINEAR, **kwargs, **init)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        for key, p in pm.named_parameters():
            if p.requires_grad:
                if any(k in key for k in ("lora_E", "miss_block", "boft_s", "ia3_l")):
                    p.add_(torch.randn_like(p) * 0.01)
                elif kind in ("loha", "lokr", "oft", "boft", "hra"):
                    p.mul_(0.1)
    pm.save_pretrained(adapter)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--factors", choices=sorted(FACTORS), default="float32", help="the adapter's stored dtype")
    parser.add_argument("--delta", choices=DELTAS, default="small", help="the size of the adapter's change")
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where the random numbers are drawn (cuda: much faster)")
    args = parser.parse_args()
    make(args.shape, args.folder, args.rank, args.shards, device=args.device, factors=args.factors, delta=args.delta)


if __name__ == "__main__":
    main()
