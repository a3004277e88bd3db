"""The model card, OUT/README.md: front matter the Hub understands, and what was merged, how, and checked."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .check.report import Report
from .paths import write_new
from .plan import Plan
from .sources import Source
from .version import __version__

log = logging.getLogger("lora_merge")
CARD_NAME = "README.md"
TAGS = ["lora", "merged", "lora-merge"]


def hub_id(source: Source | None, adapter_config: dict | None = None) -> str | None:
    """The Hub repo id a source stands for: its own, else the one the adapter was trained on."""
    from .names import repo_named

    if source is not None and source.repo_id:
        return source.repo_id
    named = (adapter_config or {}).get("base_model_name_or_path")
    repo = repo_named(named) if isinstance(named, str) else None
    return repo[0] if repo else None


def base_license(folder: Path) -> str | None:
    """The license in the base's own model card, when it has one."""
    card = folder / CARD_NAME
    if not card.is_file():
        return None
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(card).data.to_dict().get("license")
    except Exception as e:  # a malformed card of the base is not a reason to fail the merge
        log.info("could not read the base's model card: %s", e)
        return None


def _link(source: Source) -> str:
    if source.repo_id:
        return f"[{source.repo_id}](https://huggingface.co/{source.repo_id})"
    return f"`{source.spec}` (a local folder)"


def render(plan: Plan, report: Report, *, command: str, repo_id: str | None = None, tokenizer: bool = True) -> str:
    """The card's text."""
    from huggingface_hub import ModelCard, ModelCardData

    base = plan.base.source
    members = plan.adapter.members
    sources = [a.source or Source(str(a.path), a.path) for a in members]
    cfg = members[0].config
    base_repo = hub_id(base, cfg)
    data = ModelCardData(
        base_model=base_repo,
        base_model_relation="finetune" if base_repo else None,
        library_name="transformers",
        license=base_license(plan.base.path),
        tags=TAGS,
    )
    name = repo_id.split("/")[-1] if repo_id else Path(report.out).name
    targets = cfg.get("target_modules")
    targets = ", ".join(f"`{t}`" for t in targets) if isinstance(targets, list) else f"`{targets}`"
    if len(members) == 1 and members[0].format == "peft" and members[0].kind != "LoRA":
        facts = [f"- {members[0].kind} adapter" + (f", r={cfg['r']}" if "r" in cfg else ""),
                 f"- target modules: {targets}"]
    elif len(members) == 1 and members[0].format == "peft":
        facts = [
            f"- LoRA rank r={cfg.get('r', 8)}, lora_alpha={cfg.get('lora_alpha', 8)}"
            + (" (rsLoRA)" if cfg.get("use_rslora") else "")
            + (" with DoRA" if cfg.get("use_dora") else ""),
            f"- target modules: {targets}",
        ]
    else:
        facts = [f"- adapter {i + 1}: {a.format} format ({a.kind}), {len(a.targets)} base tensors"
                 + (f", weight {a.weight:g}" if a.weight != 1.0 else "") for i, a in enumerate(members)]
    if cfg.get("modules_to_save"):
        facts.append(f"- saved in full: {', '.join(f'`{m}`' for m in cfg['modules_to_save'])}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        facts.append(
            f"- per-module ranks/alphas: `{json.dumps(cfg.get('rank_pattern') or {})}` / "
            f"`{json.dumps(cfg.get('alpha_pattern') or {})}`"
        )
    counts = plan.counts()
    facts.append(
        f"- {counts['merged']} tensors merged, {counts['copied']} copied unchanged, {counts['converted']} converted"
    )
    facts += [f"- config.json: {c}" for c in plan.config_changes]
    load_from = repo_id or "path/to/this/folder"
    rows = "\n".join(f"| {c.name} | {'pass' if c.ok else 'FAIL'} | {c.summary} |" for c in report.checks)
    body = f"""
# {name}

{_link(base)} with the LoRA adapter{"s" if len(sources) > 1 else ""} {", ".join(_link(a) for a in sources)} merged into its weights by
lora-merge {__version__}. The tensors have the base model's names, shapes and
dtypes, so this model loads and runs like the base, with no adapter at inference time.

## What was merged

| | source | revision |
|---|---|---|
| base | {_link(base)} | {f"`{base.revision}`" if base.revision else "local"} |
{chr(10).join(f"| adapter | {_link(a)} | {f'`{a.revision}`' if a.revision else 'local'} |" for a in sources)}

{chr(10).join(facts)}

Every merged element is the exact `W + Σ weight·(alpha/r)·B·A` rounded once to the output dtype.

## How it was made

```{"bash" if command.startswith("lora-merge") else "python"}
{command}
```

## Parity check: {"passed" if report.ok else "FAILED"}

The merged checkpoint was read back and checked against the base and the adapter
(the full report is [merge_report.json](merge_report.json), beside the weights):

| Check | Result | Details |
|---|---|---|
{rows}

## Use it

{_usage(plan, load_from, tokenizer)}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").content


def _usage(plan: Plan, load_from: str, tokenizer: bool) -> str:
    """How to load the result: a diffusers component by its class, else a transformers causal LM (with its tokenizer
    when the folder has one)."""
    diffusers_class = plan.base.config.get("_class_name")
    if isinstance(diffusers_class, str) and diffusers_class.isidentifier():
        return (f"```python\nfrom diffusers import {diffusers_class}\n\n"
                f"model = {diffusers_class}.from_pretrained(\"{load_from}\")\n```")
    if not tokenizer:
        return ("```python\nfrom transformers import AutoModelForCausalLM\n\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{load_from}\", dtype=\"auto\")\n```\n\n"
                "This folder has no tokenizer (BASE had none): use the one the base model was published with.")
    return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{load_from}\", dtype=\"auto\")\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{load_from}\")\n```")


def write(folder: Path, plan: Plan, report: Report, *, command: str, repo_id: str | None = None) -> None:
    tokenizer = any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                                     "vocab.json", "vocab.txt"))
    write_new(folder / CARD_NAME, render(plan, report, command=command, repo_id=repo_id, tokenizer=tokenizer))
