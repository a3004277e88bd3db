"""Speed and memory of lora-merge beside `cp -r`, peft, mergekit, tinker-cookbook and axolotl, measured in one run.

    python scripts/bench.py [--shapes 0.6b 1.7b 8b] [--ranks 16] [--factors float32 bfloat16] [--deltas small large]
                            [--runs 3] [--device cpu|cuda] [--cpus N] [--no-peft] [--baseline CHECKOUT]
                            [--jobs N ...] [--no-unmerge] [--peers DIR] [--kinds KIND ...]

On first run, it generates bf16 bases with real architectures and random weights (Qwen3-0.6B,
Qwen3-1.7B and Llama-3-8B shapes; on a GPU when ``--device cuda``) and peft adapters on every linear
layer: each rank asked for, with float32 factors or bfloat16 ones (as peft saves an adapter trained on a bf16
model), drawn small or large (``make_model.make_adapter``). Then, for each model and adapter, it runs the tools in
alternation, `--runs` times each, under `/usr/bin/time -v` (and `taskset` on the first N cores with `--cpus N`):
- `cp -r BASE`, the I/O floor on this disk;
- `lora-merge BASE ADAPTER OUT --device DEVICE` (the merge and its parity check);
- peft, as users do it, on the same device: `from_pretrained` (with `device_map` on a GPU) +
  `merge_and_unload` + `save_pretrained`;
- mergekit's LoRA merge (`BASE+ADAPTER`), when `mergekit-yaml` is on the PATH;
- with `--baseline CHECKOUT`, the lora-merge of another checkout (an earlier commit, say), the same way;
- with `--peers DIR`, the streaming peers, each from its own virtual environment under DIR where it is there:
  tinker-cookbook's `weights.build_hf_model` (shard by shard; DIR/tinker-cookbook) and axolotl's memory-efficient
  `axolotl merge-lora` (DIR/axolotl, with the least config its CLI accepts). Make them with
  `python -m venv DIR/NAME && DIR/NAME/bin/pip install torch==2.13.0 NAME` for NAME in tinker-cookbook, axolotl;
then lora-merge's own way back, `lora-merge unmerge OUT ADAPTER BACK` with and without `--base BASE`.
It checks every output against lora-merge's (the unmerged ones against BASE), then prints a Markdown table
of medians and ratios.

With ``--kinds``, it measures instead lora-merge on peft's other adapter kinds (LoHa, LoKr, AdaLoRA, VeRA, MiSS,
FourierFT, IA3, OFT, BOFT, HRA, RoAd; made with peft on the same base, ``make_model.make_kind_adapter``) beside the
float32 LoRA adapter of the same shape, alternated, and prints each one's time against LoRA's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from make_model import DELTAS, FACTORS, KIND_CONFIGS, SHAPES, make_adapter, make_base, make_kind_adapter

PEFT_MERGE = """
import sys, torch, transformers, peft
base, adapter, out, device = sys.argv[1:5]
where = {} if device == "cpu" else {"device_map": device}
model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype="auto", **where)
merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out)
"""

TINKER_MERGE = """
import sys
from tinker_cookbook import weights
base, adapter, out, device = sys.argv[1:5]
weights.build_hf_model(base_model=base, adapter_path=adapter, output_path=out, device=device)
"""

# the least config axolotl's CLI accepts for a merge (it validates a training config: a dataset and a learning rate)
AXOLOTL_CONFIG = """base_model: {base}
adapter: lora
lora_model_dir: {adapter}
output_dir: {out}
merge_method: memory_efficient
datasets:
  - path: unused.jsonl
    type: alpaca
learning_rate: 0.0001
micro_batch_size: 1
gradient_accumulation_steps: 1
num_epochs: 1
sequence_len: 64
"""


def timed(cmd: list[str]) -> dict:
    """Wall and CPU seconds and peak resident memory of ``cmd``, from /usr/bin/time -v."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
        r = subprocess.run(["/usr/bin/time", "-v", "-o", f.name, *cmd], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
        text = f.read()

    def field(name: str) -> str:
        return re.search(rf"{re.escape(name)}: (.+)", text).group(1).strip()

    wall = 0.0
    for part in field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":"):
        wall = wall * 60 + float(part)
    return {
        "wall": wall,
        "cpu": float(field("User time (seconds)")) + float(field("System time (seconds)")),
        "rss_mb": int(field("Maximum resident set size (kbytes)")) / 1024,
    }


def tools(base: Path, adapter: Path, out: Path, device: str, peft: bool,
          baseline: Path | None = None, jobs: list[int] = (), peers: Path | None = None) -> dict[str, list[str]]:
    found = {
        "cp -r": ["cp", "-r", str(base), str(out)],
        "lora-merge": ["lora-merge", "-q", str(base), str(adapter), str(out), "--device", device],
    }
    for n in jobs:  # the default's rows beside lora-merge at each --jobs asked for
        found[f"lora-merge --jobs {n}"] = found["lora-merge"] + ["--jobs", str(n)]
    if baseline is not None:  # another checkout of lora-merge (its C passes built in place), run the same way
        run = (f"import sys; sys.path.insert(0, {str(baseline.resolve())!r}); sys.argv[0] = 'lora-merge'; "
               "from lora_merge.cli import main; main()")
        found["lora-merge (baseline)"] = [sys.executable, "-c", run, "-q", str(base), str(adapter), str(out),
                                          "--device", device]
    if peft:
        found["peft"] = [sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), str(out), device]
    if shutil.which("mergekit-yaml"):
        config = out.parent / "mergekit.yml"
        config.write_text(json.dumps({"models": [{"model": f"{base}+{adapter}"}], "merge_method": "passthrough",
                                      "dtype": "bfloat16"}))
        # mergekit folds the adapter in with peft into a cache folder first, then runs the merge from there
        cache = out.parent / "mergekit-cache"
        found["mergekit"] = ["mergekit-yaml", str(config), str(out), "--lora-merge-cache", str(cache)]
        if device.startswith("cuda"):
            found["mergekit"].append("--cuda")
    if peers is not None and (peers / "tinker-cookbook" / "bin" / "python").exists():
        found["tinker-cookbook"] = [str(peers / "tinker-cookbook" / "bin" / "python"), "-c", TINKER_MERGE,
                                    str(base), str(adapter), str(out), device]
    if peers is not None and (peers / "axolotl" / "bin" / "axolotl").exists():
        # it writes OUT/merged: the run's own folder is moved to OUT afterwards (see ``run_tool``)
        config = out.parent / "axolotl.yml"
        config.write_text(AXOLOTL_CONFIG.format(base=base.resolve(), adapter=adapter.resolve(),
                                                out=(out.parent / "axolotl-out").resolve()))
        found["axolotl"] = [str(peers / "axolotl" / "bin" / "axolotl"), "merge-lora", str(config)]
    return found


def compare(reference: Path, other: Path) -> str:
    """How the tensors of ``other`` compare with those of ``reference`` (lora-merge's output, or BASE)."""
    import torch
    from safetensors.torch import load_file

    ours, theirs = {}, {}
    for f in reference.glob("*.safetensors"):
        ours.update(load_file(f))
    for f in other.glob("*.safetensors"):
        theirs.update(load_file(f))
    names = [n for n in ours if n in theirs]
    same = sum(1 for n in names if torch.equal(ours[n], theirs[n]))
    worst = 0.0
    for n in names:
        a, b = ours[n].double(), theirs[n].double()
        if a.shape == b.shape and not torch.equal(a, b):
            _, exp = torch.frexp(torch.maximum(a.abs(), b.abs()))
            ulp = torch.ldexp(torch.ones_like(a), exp - 8)  # bfloat16: 8 significant bits
            worst = max(worst, float(((a - b).abs() / ulp).max()))
    missing = len(ours) - len(names)
    text = f"{same}/{len(ours)} tensors identical"
    if worst:
        text += f", max {worst:.0f} ulp apart"
    if missing:
        text += f", {missing} missing"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["0.6b", "1.7b"], choices=["0.6b", "1.7b", "8b"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[16], help="adapter ranks, e.g. 16 64 256")
    parser.add_argument("--factors", nargs="+", default=["float32", "bfloat16"], choices=sorted(FACTORS),
                        help="the adapters' stored dtypes")
    parser.add_argument("--deltas", nargs="+", default=list(DELTAS), choices=DELTAS, help="the adapters' changes")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpus", type=int, help="run every tool on the first N cores only (taskset)")
    parser.add_argument("--no-peft", action="store_true", help="leave peft out (it needs transformers and peft)")
    parser.add_argument("--dir", type=Path, default=Path(".bench"))
    parser.add_argument("--jobs", nargs="+", type=int, default=[], metavar="N",
                        help="also run lora-merge with each of these --jobs")
    parser.add_argument("--no-unmerge", action="store_true", help="leave the unmerge rows out")
    parser.add_argument("--peers", type=Path, metavar="DIR",
                        help="also run tinker-cookbook and axolotl from their virtual environments DIR/tinker-cookbook "
                             "and DIR/axolotl (each where it is there)")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="also run the lora-merge of another checkout (e.g. `git worktree add ../before HEAD~1`, "
                             "then `pip install -e ../before --no-deps` in a scratch venv, or `python setup.py "
                             "build_ext --inplace` there): before and after in one run")
    parser.add_argument("--kinds", nargs="+", choices=sorted(KIND_CONFIGS), metavar="KIND",
                        help=f"measure these adapter kinds against LoRA instead ({', '.join(sorted(KIND_CONFIGS))})")
    args = parser.parse_args()
    if args.kinds:
        kinds_table(args)
        return
    os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")  # no telemetry from a benchmark
    pin = ["taskset", "-c", f"0-{args.cpus - 1}"] if args.cpus else []
    draw_on = "cuda" if args.device.startswith("cuda") else "cpu"

    rows = []
    for shape in args.shapes:
        folder = args.dir / f"{SHAPES[shape]['arch']}-{shape}"
        base = folder / "base"
        if not (base / "model.safetensors.index.json").is_file():
            print(f"generating {base} …", file=sys.stderr)
            make_base(shape, base, device=draw_on)
        for rank, factors, delta in itertools.product(args.ranks, args.factors, args.deltas):
            kind = f"r={rank}, {factors} factors, {delta} delta"
            adapter = folder / f"adapter-r{rank}-{factors}-{delta}"
            if not (adapter / "adapter_config.json").is_file():
                make_adapter(shape, adapter, base, rank, device=draw_on, factors=factors, delta=delta)
            work = folder / "runs"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            commands = {n: pin + c for n, c in tools(base, adapter, work / "out", args.device, not args.no_peft,
                                                     args.baseline, args.jobs, args.peers).items()}
            names = list(commands)
            results: dict[str, list[dict]] = {n: [] for n in names}
            kept: dict[str, Path] = {}
            for run in range(args.runs):
                for name in names[run % len(names):] + names[:run % len(names)]:  # alternate the order
                    out = work / "out"
                    shutil.rmtree(out, ignore_errors=True)
                    shutil.rmtree(work / "mergekit-cache", ignore_errors=True)  # no run reuses another's
                    shutil.rmtree(work / "axolotl-out", ignore_errors=True)
                    results[name].append(timed(commands[name]))
                    if name == "axolotl":  # its merged model is in OUT/merged of its own output folder
                        shutil.move(work / "axolotl-out" / "merged", out)
                    print(f"{shape} {kind} run {run + 1}: {name} {results[name][-1]['wall']:.2f} s", file=sys.stderr)
                    if run == 0 and name != "cp -r":  # keep the first output of each tool to compare
                        kept[name] = work / name
                        shutil.move(out, kept[name])
            checks = {n: compare(kept["lora-merge"], p) for n, p in kept.items() if n != "lora-merge"}
            merged, back = kept["lora-merge"], work / "out"
            undo = pin + ["lora-merge", "unmerge", "-q", str(merged), str(adapter), str(back), "--device", args.device]
            undoing = {} if args.no_unmerge else {"lora-merge unmerge": undo,
                                                  "lora-merge unmerge --base": undo + ["--base", str(base)]}
            for name, cmd in undoing.items():
                names.append(name)
                results[name] = []
                for run in range(args.runs):
                    shutil.rmtree(back, ignore_errors=True)
                    results[name].append(timed(cmd))
                    print(f"{shape} {kind} run {run + 1}: {name} {results[name][-1]['wall']:.2f} s", file=sys.stderr)
                checks[name] = compare(base, back).replace("identical", "identical to BASE")
            med = {n: {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu", "rss_mb")} for n, rs in results.items()}
            for name in names:
                m = med[name]
                rows.append(
                    f"| {SHAPES[shape]['arch'].capitalize()}-{shape} shape, {kind} | {name} | {m['wall']:.2f} "
                    f"| {m['cpu']:.2f} | {m['rss_mb']:,.0f} | {m['wall'] / med['cp -r']['wall']:.2f}x "
                    f"| {m['wall'] / med['lora-merge']['wall']:.2f}x "
                    f"| {checks.get(name, 'reference' if name == 'lora-merge' else '-')} |"
                )
            shutil.rmtree(work, ignore_errors=True)

    import torch

    helps = sorted(timed(["lora-merge", "--help"])["wall"] for _ in range(5))
    print(f"`lora-merge --help`: {helps[2]:.2f} s (median of 5)")
    cores = f"{args.cpus} of {os.cpu_count()} cores" if args.cpus else f"{os.cpu_count()} cores"
    print(f"{platform.machine()}, {cores}, torch {torch.__version__}; "
          f"medians of {args.runs} runs, tools alternated; lora-merge --device {args.device}")
    print("| model and adapter | tool | wall (s) | CPU (s) | peak RSS (MB) | vs cp | vs lora-merge | output vs lora-merge |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def kinds_table(args) -> None:
    """lora-merge on each adapter kind and on LoRA (r=16, float32 factors, small delta), alternated."""
    pin = ["taskset", "-c", f"0-{args.cpus - 1}"] if args.cpus else []
    rows = []
    for shape in args.shapes:
        folder = args.dir / f"{SHAPES[shape]['arch']}-{shape}"
        base = folder / "base"
        if not (base / "model.safetensors.index.json").is_file():
            make_base(shape, base)
        adapters = {"lora": folder / "adapter-r16-float32-small"}
        if not (adapters["lora"] / "adapter_config.json").is_file():
            make_adapter(shape, adapters["lora"], base, 16)
        for kind in args.kinds:
            adapters[kind] = folder / f"adapter-{kind}"
            if not (adapters[kind] / "adapter_config.json").is_file():
                print(f"making {adapters[kind]} …", file=sys.stderr)
                make_kind_adapter(kind, adapters[kind], base)
        work = folder / "runs"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        results: dict[str, list[dict]] = {k: [] for k in adapters}
        names = list(adapters)
        for run in range(args.runs):
            for kind in names[run % len(names):] + names[:run % len(names)]:
                shutil.rmtree(work / "out", ignore_errors=True)
                cmd = pin + ["lora-merge", "-q", str(base), str(adapters[kind]), str(work / "out"), "--device", args.device]
                results[kind].append(timed(cmd))
                print(f"{shape} {kind} run {run + 1}: {results[kind][-1]['wall']:.2f} s", file=sys.stderr)
        med = {k: {f: statistics.median(r[f] for r in rs) for f in ("wall", "cpu", "rss_mb")} for k, rs in results.items()}
        for kind in names:
            m = med[kind]
            rows.append(f"| {SHAPES[shape]['arch'].capitalize()}-{shape} shape | {kind} | {m['wall']:.2f} | {m['cpu']:.2f} "
                        f"| {m['rss_mb']:,.0f} | {m['wall'] / med['lora']['wall']:.2f}x |")
        shutil.rmtree(work, ignore_errors=True)
    cores = f"{args.cpus} of {os.cpu_count()} cores" if args.cpus else f"{os.cpu_count()} cores"
    print(f"{platform.machine()}, {cores}; medians of {args.runs} runs, alternated; lora-merge --device {args.device}")
    print("| model | adapter kind | wall (s) | CPU (s) | peak RSS (MB) | vs LoRA |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
