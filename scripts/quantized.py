"""Memory and speed of merges into quantized bases, beside `cp -r` and peft, measured in one run.

    python scripts/quantized.py [--models fp8-0.6b fp8-1.7b mxfp4-1 mxfp4-4] [--runs 1] [--no-peft]

On first run it generates the bases, with real names and shapes and random weights:
- ``fp8-0.6b``, ``fp8-1.7b``: the Qwen3 shapes of ``make_model.py`` with every linear layer stored as FP8 the
  way Qwen3's FP8 releases store it (float8_e4m3fn, a float32 ``weight_scale_inv`` per 128×128 block), and a
  LoRA adapter (r=16) on every linear layer;
- ``mxfp4-N``: gpt-oss-20b's shapes with N layers (32 experts of 2880 × 5760 and 2880 × 2880 each, stored as
  MXFP4 like the gpt-oss release) and an adapter (r=16) on the attention and on both expert parameters.
Then it runs, under `/usr/bin/time -v`: `cp -r BASE`; lora-merge writing the merge in BASE's format; lora-merge
with ``--dtype bfloat16``; and peft as users do it (transformers dequantizing on load, ``merge_and_unload``,
``save_pretrained``, which writes FP8 back as FP8 and MXFP4 experts dense), whose output is compared value by
value with lora-merge's in the same form.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import sys
from pathlib import Path

import torch
from bench import timed
from make_model import make
from safetensors import safe_open
from safetensors.torch import load_file, save_file

PEFT_MERGE = """
import sys, torch, transformers, peft
base, adapter, out, method = sys.argv[1:5]
config = transformers.FineGrainedFP8Config if method == "fp8" else transformers.Mxfp4Config
model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16,
                                                          quantization_config=config(dequantize=True))
merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out)
"""
GPT_OSS_20B = dict(hidden=2880, inter=2880, experts=32, heads=64, kv=8, head_dim=64, vocab=201088)


def fp8_base(shape: str, folder: Path) -> None:
    """A Qwen3-shaped base with its linear layers in FP8 (128×128 blocks), and its adapter."""
    make(shape, folder)
    base = folder / "base"
    for shard in sorted(base.glob("*.safetensors")):
        tensors = load_file(shard)
        out = {}
        for name, w in tensors.items():
            if name.endswith("proj.weight"):
                out[name], out[name.removesuffix("weight") + "weight_scale_inv"] = _fp8(w)
            else:
                out[name] = w
        save_file(out, shard, metadata={"format": "pt"})
    index = json.loads((base / "model.safetensors.index.json").read_text())
    for name, file in list(index["weight_map"].items()):
        if name.endswith("proj.weight"):
            index["weight_map"][name.removesuffix("weight") + "weight_scale_inv"] = file
    (base / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": [128, 128]}
    (base / "config.json").write_text(json.dumps(config, indent=2))


def _fp8(w: torch.Tensor, block: int = 128):
    rows, cols = w.shape
    sr, sc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(sr * block, sc * block)
    padded[:rows, :cols] = w.float()
    blocks = padded.reshape(sr, block, sc, block)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448).clamp(min=1e-12)
    codes = (blocks / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    return codes.reshape(sr * block, sc * block)[:rows, :cols].contiguous(), scale


def mxfp4_base(layers: int, folder: Path, rank: int = 16) -> None:
    """gpt-oss-20b's shapes with ``layers`` layers, experts in MXFP4, and an adapter on attention and experts."""
    c = GPT_OSS_20B
    g = torch.Generator().manual_seed(0)
    base, adapter = folder / "base", folder / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    h, e, inter, q, kv = c["hidden"], c["experts"], c["inter"], c["heads"] * c["head_dim"], c["kv"] * c["head_dim"]

    def bf16(*shape):
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map, lora = {}, {}
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": bf16(h), p + "post_attention_layernorm.weight": bf16(h),
             p + "self_attn.sinks": bf16(c["heads"]), p + "mlp.router.weight": bf16(e, h), p + "mlp.router.bias": bf16(e)}
        for name, out, inn in (("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q)):
            t[p + f"self_attn.{name}.weight"], t[p + f"self_attn.{name}.bias"] = bf16(out, inn), bf16(out)
            lora[f"base_model.model.{p}self_attn.{name}.lora_A.weight"] = torch.randn(rank, inn, generator=g) * 0.01
            lora[f"base_model.model.{p}self_attn.{name}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.01
        for name, out, inn in (("gate_up_proj", 2 * inter, h), ("down_proj", h, inter)):
            t[p + f"mlp.experts.{name}_blocks"] = torch.randint(0, 256, (e, out, inn // 32, 16), generator=g,
                                                                dtype=torch.uint8)
            t[p + f"mlp.experts.{name}_scales"] = torch.randint(118, 123, (e, out, inn // 32), generator=g,
                                                                dtype=torch.uint8)
            t[p + f"mlp.experts.{name}_bias"] = bf16(e, out)
        # peft's wrappers of the two expert parameters, nested in the order they were named
        for key, out, inn in (("base_layer.", 2 * inter, h), ("", h, inter)):
            lora[f"base_model.model.{p}mlp.experts.{key}lora_A.weight"] = torch.randn(e * rank, inn, generator=g) * 0.01
            lora[f"base_model.model.{p}mlp.experts.{key}lora_B.weight"] = torch.randn(out, rank * e, generator=g) * 0.01
        file = f"model-{i + 1:05d}-of-{layers + 1:05d}.safetensors"
        save_file(t, base / file, metadata={"format": "pt"})
        weight_map |= {n: file for n in t}
    last = f"model-{layers + 1:05d}-of-{layers + 1:05d}.safetensors"
    t = {"model.embed_tokens.weight": bf16(c["vocab"], h), "model.norm.weight": bf16(h), "lm_head.weight": bf16(c["vocab"], h)}
    save_file(t, base / last, metadata={"format": "pt"})
    weight_map |= {n: last for n in t}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (base / "config.json").write_text(json.dumps({
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": c["heads"], "num_key_value_heads": c["kv"],
        "head_dim": c["head_dim"], "vocab_size": c["vocab"], "num_local_experts": e, "num_experts_per_tok": 4,
        "layer_types": ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2),
        "sliding_window": 128, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
    }, indent=2))
    save_file(lora, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "target_parameters": ["gate_up_proj", "down_proj"], "bias": "none", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
    }, indent=2))


E2M1_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64)
CHUNK = 1 << 24  # elements decoded at a time


class Values:
    """A checkpoint's tensors as the values the model computes with, in float64, a slice at a time: FP8 codes
    times their block's ``weight_scale_inv``, MXFP4 ``*_blocks`` with ``*_scales`` (experts × in × out, as
    transformers dequantizes them), anything else as stored."""

    def __init__(self, folder: Path):
        self.file = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(f, "pt") as h:
                self.file.update(dict.fromkeys(h.keys(), f))
        mxfp4 = {n.removesuffix("_blocks") for n in self.file
                 if n.endswith("_blocks") and n.removesuffix("_blocks") + "_scales" in self.file}
        parts = {m + suffix for m in mxfp4 for suffix in ("_blocks", "_scales")}
        self.names = mxfp4 | {n for n in self.file if n not in parts and not n.endswith("_scale_inv")}

    def _get(self, name: str, start: int, stop: int) -> torch.Tensor:
        with safe_open(self.file[name], "pt") as h:
            return h.get_slice(name)[start:stop]

    def _shape(self, name: str) -> list[int]:
        with safe_open(self.file[name], "pt") as h:
            return h.get_slice(name).get_shape()

    def bits(self, name: str) -> int:
        """Significant bits of the form ``name`` is stored in (e2m1: 2, e4m3: 4, bfloat16: 8, ...)."""
        if name + "_blocks" in self.file and name + "_scales" in self.file:
            return 2
        with safe_open(self.file[name], "pt") as h:
            dtype = h.get_slice(name).get_dtype()
        return {"F8_E4M3": 4, "BF16": 8, "F16": 11, "F32": 24}.get(dtype, 53)

    def chunks(self, name: str):
        """(start, stop, float64 values of those rows) along the first axis."""
        if name + "_blocks" in self.file and name + "_scales" in self.file:  # two e2m1 codes a byte, the even element low; 2^(byte - 127) per 32
            for e in range(self._shape(name + "_blocks")[0]):
                t, scales = self._get(name + "_blocks", e, e + 1), self._get(name + "_scales", e, e + 1)
                codes = torch.stack((t & 15, t >> 4), -1).reshape(*t.shape[:-1], 32).long()
                values = E2M1_VALUES[codes] * torch.exp2(scales.double() - 127).unsqueeze(-1)
                yield e, e + 1, values.reshape(1, t.shape[1], -1).transpose(1, 2)
            return
        shape = self._shape(name)
        rows = shape[0] if shape else 1
        step = max(1, CHUNK // max(1, math.prod(shape[1:])))
        scale_shape = self._shape(name + "_scale_inv") if name + "_scale_inv" in self.file else None
        if scale_shape:
            bm = -(-rows // scale_shape[0])
            step = -(-step // bm) * bm
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            t = self._get(name, start, stop).double() if shape else self._get(name, 0, 0).double()
            if scale_shape:
                scale = self._get(name + "_scale_inv", start // bm, -(-stop // bm)).double()
                bn = -(-shape[1] // scale_shape[1])
                t = t * scale.repeat_interleave(bm, 0)[:stop - start].repeat_interleave(bn, 1)[:, :shape[1]]
            yield start, stop, t


def compare_any(reference: Path, other: Path) -> str:
    """How far ``other``'s values are from lora-merge's (``reference``), both decoded: tensors with the same
    values, the largest difference of the others in steps of lora-merge's form (a step: the spacing of that
    form's values at the larger magnitude, ignoring its scales), and the tensors only one of them has."""
    ours, theirs = Values(reference), Values(other)
    # a dense tensor saved under a quantized name (transformers writes dequantized experts as `*_blocks`)
    renamed = {n.removesuffix("_blocks"): n for n in theirs.names - ours.names
               if n.endswith("_blocks") and n.removesuffix("_blocks") in ours.names}
    theirs.names = (theirs.names - set(renamed.values())) | set(renamed)
    same, worst = 0, 0.0
    for n in sorted(ours.names & theirs.names):
        equal = True
        bits = ours.bits(n)
        for (_, _, a), (_, _, b) in zip(ours.chunks(n), theirs.chunks(renamed.get(n, n))):
            if not torch.equal(a, b):
                equal = False
                _, exp = torch.frexp(torch.maximum(a.abs(), b.abs()))
                worst = max(worst, float(((a - b).abs() / torch.ldexp(torch.ones_like(a), exp - bits)).max()))
        same += equal
    words = [f"{same}/{len(ours.names)} tensors with the same values"]
    if renamed:
        words.append(f"{len(renamed)} dense ones stored as *_blocks without *_scales ({min(renamed.values())}, …)")
    if worst:
        words.append(f"the others up to {worst:.0f} steps apart")
    for label, names in (("only in lora-merge's", ours.names - theirs.names), ("added", theirs.names - ours.names)):
        if names:
            words.append(f"{len(names)} {label} ({min(names)}{', …' if len(names) > 1 else ''})")
    return ", ".join(words)


MODELS = {
    "fp8-0.6b": ("fp8", "Qwen3-0.6B shape, FP8 128×128", lambda f: fp8_base("0.6b", f)),
    "fp8-1.7b": ("fp8", "Qwen3-1.7B shape, FP8 128×128", lambda f: fp8_base("1.7b", f)),
    "mxfp4-1": ("mxfp4", "gpt-oss-20b shape, 1 layer, MXFP4", lambda f: mxfp4_base(1, f)),
    "mxfp4-4": ("mxfp4", "gpt-oss-20b shape, 4 layers, MXFP4", lambda f: mxfp4_base(4, f)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--no-peft", action="store_true", help="leave peft out (it needs transformers and peft)")
    parser.add_argument("--dir", type=Path, default=Path(".bench-quantized"))
    args = parser.parse_args()

    rows = []
    for key in args.models:
        method, label, build = MODELS[key]
        folder = args.dir / key
        if not (folder / "base" / "config.json").is_file():
            print(f"generating {folder} …", file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
            build(folder)
        base, adapter, work = folder / "base", folder / "adapter", folder / "runs"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        out = work / "out"
        commands = {
            "cp -r": ["cp", "-r", str(base), str(out)],
            "lora-merge (kept format)": ["lora-merge", "-q", str(base), str(adapter), str(out), "--device", "cpu"],
            "lora-merge --dtype bfloat16": ["lora-merge", "-q", str(base), str(adapter), str(out), "--device", "cpu",
                                            "--dtype", "bfloat16"],
        }
        if not args.no_peft:
            commands["peft"] = [sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), str(out), method]
        results: dict[str, list[dict]] = {n: [] for n in commands}
        kept: dict[str, Path] = {}
        names = list(commands)
        for run in range(args.runs):
            for name in names[run % len(names):] + names[:run % len(names)]:
                shutil.rmtree(out, ignore_errors=True)
                results[name].append(timed(commands[name]))
                print(f"{key} run {run + 1}: {name} {results[name][-1]['wall']:.2f} s", file=sys.stderr)
                if run == 0 and name != "cp -r":
                    kept[name] = work / f"kept-{len(kept)}"
                    shutil.move(out, kept[name])
        med = {n: {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu", "rss_mb")} for n, rs in results.items()}
        versus = {}
        if "peft" in kept:  # transformers saves FP8 back as FP8, MXFP4 experts dense (under *_blocks names)
            ours = "lora-merge (kept format)" if method == "fp8" else "lora-merge --dtype bfloat16"
            versus = {ours: "reference", "peft": compare_any(kept[ours], kept["peft"])}
        for name in names:
            m = med[name]
            rows.append(f"| {label} | {name} | {m['wall']:.2f} | {m['cpu']:.2f} | {m['rss_mb']:,.0f} "
                        f"| {m['wall'] / med['cp -r']['wall']:.2f}x | {versus.get(name, '-')} |")
        shutil.rmtree(work, ignore_errors=True)

    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; medians of {args.runs} "
          "run(s), tools alternated")
    print("| base | tool | wall (s) | CPU (s) | peak RSS (MB) | vs cp | values vs lora-merge's (same form) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
