"""Latency parity: greedy decoding with the base, the unmerged adapter (peft) and the merged model.

The claim a merge rests on is that the merged model costs what the base costs: the same tensors, so
the same bytes read per decoded token. This times all three side by side in one process, in
rotation, after a discarded warm-up. It needs transformers and peft (the ``latency`` extra).
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

from .errors import LatencyError, first_line

CONDITIONS = ("base", "unmerged", "merged")
PROMPT_TOKENS = 16


def _imports():
    import importlib
    import importlib.util

    missing = [name for name in ("transformers", "peft")  # (None in sys.modules: blocked, as if absent)
               if sys.modules.get(name, True) is None or importlib.util.find_spec(name) is None]
    if missing:
        raise LatencyError(f"--latency needs transformers and peft ({' and '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} not installed)", "pip install 'lora-merge[latency]'")
    return importlib.import_module("transformers"), importlib.import_module("peft")


def _load(transformers, folder: Path, device, vocab: int | None = None):
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices about the loaded model, not the user's concern
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    except Exception as e:  # transformers raises many kinds; the user needs the first line only
        raise LatencyError(f"transformers cannot load {folder}: {first_line(e)}",
                           "latency needs a transformers model") from e
    if vocab is not None and model.get_input_embeddings().weight.shape[0] != vocab:
        model.resize_token_embeddings(vocab)  # the adapter resized the vocabulary: the unmerged model must too
    return model


def _weights_read_per_token(model) -> int:
    """Bytes of parameters a decode step reads: all of them, but only one row of an untied input embedding."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is None or head.weight.data_ptr() != emb.data_ptr():
        total -= emb.numel() * emb.element_size() - emb.shape[1] * emb.element_size()
    return total


def _greedy(torch, model, ids, new_tokens: int):
    """``new_tokens`` greedy steps with the KV cache: one prefill, then one token at a time."""
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        tokens = [out.logits[:, -1:].argmax(-1)]
        for _ in range(new_tokens - 1):
            out = model(input_ids=tokens[-1], past_key_values=out.past_key_values, use_cache=True)
            tokens.append(out.logits[:, -1:].argmax(-1))
    return torch.cat(tokens, dim=1)


def measure_latency(
    base: Path,
    adapter: Path,
    merged: Path,
    device,
    *,
    new_tokens: int = 64,
    runs: int = 10,
    prompt: str | None = None,
    progress=None,
) -> dict:
    """Time greedy decoding of ``new_tokens`` tokens under the three conditions, ``runs`` counted runs each
    (``device``: a Device, or a torch device)."""
    import torch

    device = getattr(device, "torch", device)
    transformers, peft = _imports()
    if new_tokens < 1 or runs < 2:
        raise LatencyError(
            "--new-tokens must be at least 1 and --runs at least 2", "a standard deviation needs two runs"
        )
    merged_model = _load(transformers, merged, device)
    vocab = merged_model.get_input_embeddings().weight.shape[0]
    try:
        unmerged = peft.PeftModel.from_pretrained(_load(transformers, base, device, vocab), adapter)
    except LatencyError:
        raise
    except Exception as e:
        raise LatencyError(f"peft cannot load the adapter {adapter}: {first_line(e)}") from e
    models = {"base": _load(transformers, base, device), "unmerged": unmerged, "merged": merged_model}
    for m in models.values():
        m.to(device).eval()

    if prompt is not None:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
        except Exception as e:
            raise LatencyError(
                f"--prompt needs a tokenizer in {merged}: {e}", "leave out --prompt to use fixed token ids"
            ) from e
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    else:  # fixed, spread over the vocabulary, the same for every condition
        ids = torch.tensor([[(7919 * i + 13) % vocab for i in range(PROMPT_TOKENS)]])
    ids = ids.to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(name: str) -> tuple[float, object]:
        sync()
        start = time.perf_counter()
        tokens = _greedy(torch, models[name], ids, new_tokens)
        sync()
        return time.perf_counter() - start, tokens

    outputs = {name: timed(name)[1] for name in CONDITIONS}  # warm-up, discarded
    times: dict[str, list[float]] = {name: [] for name in CONDITIONS}
    for run in range(runs):
        order = CONDITIONS[run % 3 :] + CONDITIONS[: run % 3]  # rotate, so that no condition always goes first
        for name in order:
            seconds, _ = timed(name)
            times[name].append(seconds)
        if progress is not None:
            progress.update(1)

    same = outputs["merged"].cpu() == outputs["unmerged"].cpu()
    first_difference = None if bool(same.all()) else int((~same[0]).nonzero()[0])
    conditions = {
        name: {
            "mean_s": statistics.fmean(ts),
            "std_s": statistics.stdev(ts),
            "runs": len(ts),
            "times_s": [round(t, 6) for t in ts],
            "weights_read_per_token_bytes": _weights_read_per_token(models[name]),
        }
        for name, ts in times.items()
    }
    base_mean = conditions["base"]["mean_s"]
    return {
        "device": str(device),
        "dtype": str(next(models["merged"].parameters()).dtype).removeprefix("torch."),
        "new_tokens": new_tokens,
        "prompt_tokens": int(ids.shape[1]),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "conditions": conditions,
        "ratios": {
            "merged/base": conditions["merged"]["mean_s"] / base_mean,
            "unmerged/base": conditions["unmerged"]["mean_s"] / base_mean,
        },
        "merged_tokens_equal_unmerged": first_difference is None,
        "first_token_difference": first_difference,
    }


def latency_table(result: dict) -> str:
    lines = [
        f"latency: greedy decoding of {result['new_tokens']} new tokens from {result['prompt_tokens']} prompt tokens, "
        f"{result['device']}, {result['dtype']}",
        "| Condition | Mean latency (s) | Std dev (s) | Runs | vs base | Weights read per token (MB) |",
        "|---|---|---|---|---|---|",
    ]
    base = result["conditions"]["base"]["mean_s"]
    for name in CONDITIONS:
        c = result["conditions"][name]
        lines.append(
            f"| {name} | {c['mean_s']:.4f} | {c['std_s']:.4f} | {c['runs']} | {c['mean_s'] / base:.2f}x | "
            f"{c['weights_read_per_token_bytes'] / 1e6:,.1f} |"
        )
    if result["merged_tokens_equal_unmerged"]:
        lines.append("  merged and unmerged models chose the same tokens")
    else:
        lines.append(
            f"  merged and unmerged models first chose different tokens at step {result['first_token_difference']}"
            " (rounding to the checkpoint dtype can flip a near-tie)"
        )
    return "\n".join(lines)
