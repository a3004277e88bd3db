"""Build a small Llama-shaped bf16 model and a PEFT LoRA adapter, merge them, check the result.

Needs only lora-merge's own dependencies (no download, no transformers):

    python scripts/demo.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HIDDEN, INTER, LAYERS, VOCAB, R, ALPHA = 256, 512, 4, 1000, 8, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shapes():
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (HIDDEN,)
        yield p + "post_attention_layernorm.weight", (HIDDEN,)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield p + f"self_attn.{name}.weight", (HIDDEN, HIDDEN)
        yield p + "mlp.gate_proj.weight", (INTER, HIDDEN)
        yield p + "mlp.up_proj.weight", (INTER, HIDDEN)
        yield p + "mlp.down_proj.weight", (HIDDEN, INTER)
    yield "model.embed_tokens.weight", (VOCAB, HIDDEN)
    yield "model.norm.weight", (HIDDEN,)
    yield "lm_head.weight", (VOCAB, HIDDEN)


def build(root: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    base, adapter = root / "base", root / "adapter"
    base.mkdir()
    adapter.mkdir()
    tensors = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in shapes()}
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, base / shard, metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (base / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": VOCAB, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    }, indent=2))
    (base / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7}))
    (base / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))

    lora = {}
    for name, shape in shapes():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            out, inn = shape
            lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(R, inn, generator=g) * 0.05
            lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, R, generator=g) * 0.05
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": TARGETS, "bias": "none",
        "base_model_name_or_path": str(base),
    }, indent=2))
    return base, adapter


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build and merge in this folder and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="lora-merge-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    base, adapter = build(root)
    out = root / "merged"
    cmd = [sys.executable, "-m", "lora_merge", str(base), str(adapter), str(out), "--overwrite"]
    print("$ lora-merge", *cmd[3:], flush=True)
    subprocess.run(cmd, check=True)

    # An independent check of one merged tensor: W + (alpha/r)·B·A, in float64, rounded once.
    name = "model.layers.1.self_attn.q_proj"
    merged = {**load_file(out / "model-00001-of-00002.safetensors"), **load_file(out / "model-00002-of-00002.safetensors")}
    original = {**load_file(base / "model-00001-of-00002.safetensors"), **load_file(base / "model-00002-of-00002.safetensors")}
    lora = load_file(adapter / "adapter_model.safetensors")
    a = lora[f"base_model.model.{name}.lora_A.weight"].double()
    b = lora[f"base_model.model.{name}.lora_B.weight"].double()
    expected = original[f"{name}.weight"].double() + (ALPHA / R) * (b @ a)
    got = merged[f"{name}.weight"].double()
    worst = ((got - expected).abs() / expected.abs().clamp(min=1e-30)).max().item()
    untouched = sum(torch.equal(merged[n], original[n]) for n in original if "norm" in n or "embed" in n or "lm_head" in n)
    print(f"{name}: largest relative error after rounding to bf16: {worst:.2e} (half a bf16 ulp is 3.9e-03)")
    print(f"untouched tensors identical to the base: {untouched}")
    print(f"output: {out}" + ("" if args.keep else " (a temporary folder)"))
    return 0 if worst <= 2**-8 else 1


if __name__ == "__main__":
    sys.exit(main())
