"""Build a small Qwen3-shaped bf16 model and a PEFT LoRA adapter, merge them, check the result.

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
from make_model import make
from safetensors.torch import load_file

SMALL = dict(hidden=256, inter=512, layers=4, heads=4, kv=2, head_dim=64, vocab=1000)


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="build and merge in this folder and keep it")
    args = parser.parse_args()
    if args.keep:
        return run(args.keep, keep=True)
    with tempfile.TemporaryDirectory(prefix="lora-merge-demo-") as root:
        return run(Path(root), keep=False)


def run(root: Path, keep: bool) -> int:
    make(SMALL, root, rank=8, shards=2)
    base, adapter, out = root / "base", root / "adapter", root / "merged"
    cmd = [sys.executable, "-m", "lora_merge", str(base), str(adapter), str(out), "--overwrite"]
    print("$ lora-merge", *cmd[3:], flush=True)
    subprocess.run(cmd, check=True)

    # An independent check of one merged tensor: W + (alpha/r)·B·A in float64, against the bf16 output.
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    merged, original, lora = load_all(out), load_all(base), load_file(adapter / "adapter_model.safetensors")
    name = "model.layers.1.self_attn.q_proj"
    a = lora[f"base_model.model.{name}.lora_A.weight"].double()
    b = lora[f"base_model.model.{name}.lora_B.weight"].double()
    expected = original[f"{name}.weight"].double() + scale * (b @ a)
    got = merged[f"{name}.weight"].double()
    worst = ((got - expected).abs() / expected.abs().clamp(min=1e-30)).max().item()
    same = sum(torch.equal(merged[n], original[n]) for n in original if "norm" in n or "embed" in n)
    print(f"{name}: largest relative error after rounding to bf16: {worst:.2e} (at most 2^-8 = 3.9e-03)")
    print(f"norms and embeddings identical to the base: {same}")
    print(f"output: {out}" if keep else "output: removed with its temporary folder (--keep DIR keeps it)")
    return 0 if worst <= 2**-8 else 1


if __name__ == "__main__":
    sys.exit(main())
