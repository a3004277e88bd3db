"""Latency parity on a generated Qwen3-0.6B-shaped model: base vs unmerged adapter vs merged.

    python scripts/latency.py [--shape 0.6b] [--new-tokens 64] [--runs 10] [--device auto]

Generates the bf16 base and an r=16 adapter on every linear layer (random weights, real architecture)
on first run, merges them with lora-merge, checks the merge, then times greedy decoding under the three
conditions in one process (what `lora-merge verify OUT --base BASE --adapter ADAPTER --latency` does)
and prints the Markdown table. Needs the latency extra: pip install 'lora-merge[latency]'.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from make_model import SHAPES, make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.6b")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dir", type=Path, default=Path(".bench"), help="where models are generated and kept")
    args = parser.parse_args()

    import torch

    from lora_merge import pipeline
    from lora_merge.latency import latency_table, measure_latency

    folder = args.dir / f"qwen3-{args.shape}"
    if not (folder / "base" / "model.safetensors.index.json").is_file():
        print(f"generating {folder} …", file=sys.stderr)
        make(args.shape, folder)
    out = folder / "merged"
    pipeline.merge(str(folder / "base"), str(folder / "adapter"), out, device=args.device, overwrite=True)
    device = pipeline.resolve_device(args.device).torch
    result = measure_latency(
        folder / "base", folder / "adapter", out, device, new_tokens=args.new_tokens, runs=args.runs
    )
    (folder / "latency.json").write_text(json.dumps(result, indent=2) + "\n")
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(f"Qwen3-{args.shape}-shaped model, bf16, r=16 on every linear layer; {where}; torch {torch.__version__}")
    print(latency_table(result))
    print(
        f"ratios: merged/base {result['ratios']['merged/base']:.3f}, "
        f"unmerged/base {result['ratios']['unmerged/base']:.3f}"
    )


if __name__ == "__main__":
    main()
