#!/usr/bin/env bash
# Peak resident memory and wall time of lora-merge on generated Qwen3-shaped bf16 models (r=16 on
# every linear layer), beside `cp -r` of the same base. Usage: scripts/measure_memory.sh [0.6b 1.7b]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${BENCH_DIR:-.bench}
shapes=("${@:-0.6b 1.7b}")
mkdir -p "$work"
printf '| model | base size | cp -r (s) | lora-merge (s) | ratio | lora-merge peak RSS (MB) |\n|---|---|---|---|---|---|\n'
for shape in ${shapes[@]}; do
  dir="$work/qwen3-$shape"
  [ -f "$dir/base/model.safetensors.index.json" ] || python scripts/make_model.py "$shape" "$dir" >&2
  rm -rf "$dir/cp" "$dir/out"
  cp_s=$( { /usr/bin/time -f "%e" cp -r "$dir/base" "$dir/cp"; } 2>&1 | tail -1 )
  rm -rf "$dir/cp"
  stats=$( { /usr/bin/time -f "%e %M" lora-merge -q "$dir/base" "$dir/adapter" "$dir/out"; } 2>&1 | tail -1 )
  lm_s=${stats% *}; rss_kb=${stats#* }
  size=$(du -sh "$dir/base" | cut -f1)
  ratio=$(python -c "print(f'{$lm_s/$cp_s:.1f}x')")
  printf '| Qwen3-%s shape | %s | %s | %s | %s | %d |\n' "$shape" "$size" "$cp_s" "$lm_s" "$ratio" $((rss_kb / 1024))
  rm -rf "$dir/out"
done
