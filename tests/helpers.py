"""What the tests share besides fixtures: tiny real models and real peft adapters built in the test session
(no network), reading tensors back, comparing in ulps, and running the command line in this process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)


def model_config(kind: str, **overrides):
    if kind == "llama":
        cfg = transformers.LlamaConfig(**SMALL, tie_word_embeddings=False)
    elif kind == "qwen3":  # tied embeddings
        cfg = transformers.Qwen3Config(**SMALL, head_dim=8, tie_word_embeddings=True)
    elif kind == "qwen2":  # attention biases
        cfg = transformers.Qwen2Config(**SMALL, tie_word_embeddings=False)
    elif kind == "gpt2":  # Conv1D layers (weights stored in × out)
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64)
    else:
        raise ValueError(kind)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build_model(kind: str, folder: Path, *, sharded: bool = False, dtype=torch.float32, seed: int = 0, **overrides):
    """A random tiny model saved like a Hub checkpoint, with tokenizer-like files beside it."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(model_config(kind, **overrides))
    with torch.no_grad():  # norms and biases away from their 1/0 init, so that copies are checked for real
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(dtype)
    model.save_pretrained(folder, max_shard_size="20KB" if sharded else "10GB")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64, "chat_template": "{{x}}"}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel"}}))
    (folder / "special_tokens_map.json").write_text("{}")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    return model


def build_adapter(base_dir: Path, folder: Path, *, seed: int = 1, perturb: bool = True, resize_to=None,
                  **lora_kwargs):
    """A real peft LoRA adapter on the model in ``base_dir``, with non-zero B (and perturbed extras)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if resize_to:
        model.resize_token_embeddings(resize_to)
    torch.manual_seed(seed)
    lora_kwargs.setdefault("init_lora_weights", False)
    config = peft.LoraConfig(**lora_kwargs)
    pm = peft.get_peft_model(model, config)
    if perturb:
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if p.requires_grad and ("magnitude" in name or "modules_to_save" in name or name.endswith(".bias")
                                        or "trainable_tokens" in name):
                    p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(folder)
    return pm


def bf16_factors(adapter: Path, folder: Path, bits: int = 8, lora_alpha: float | None = None) -> Path:
    """A copy of ``adapter`` with its tensors stored as bfloat16, as peft saves an adapter trained on a bfloat16
    model, each value rounded to ``bits`` significant bits (8: bfloat16's own): many merged elements then land
    exactly on a rounding midpoint, the more the fewer the bits (and where alpha / r is a power of two)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, folder)
    weights = load_file(folder / "adapter_model.safetensors")
    for k, v in weights.items():
        mantissa, exponent = torch.frexp(v.double())
        weights[k] = torch.ldexp(torch.round(mantissa * 2**bits) / 2**bits, exponent).to(torch.bfloat16)
    save_file(weights, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    if lora_alpha is not None:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": lora_alpha}))
    return folder


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def peft_reference(base_dir: Path, adapter_dir: Path, resize_to=None) -> dict[str, torch.Tensor]:
    """peft's own merge, done in float32 on a float32 copy of the base."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if resize_to:
        model.resize_token_embeddings(resize_to)
    pm = peft.PeftModel.from_pretrained(model, adapter_dir)
    merged = pm.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def ulps(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|a − b| in units in the last place of ``dtype`` at the larger magnitude."""
    a64, b64 = a.double(), b.double()
    mag = torch.maximum(a64.abs(), b64.abs())
    finfo = torch.finfo(dtype)
    exp = torch.floor(torch.log2(mag.clamp(min=finfo.tiny)))
    ulp = torch.pow(2.0, exp - _mant(dtype))
    return (a64 - b64).abs() / ulp


def _mant(dtype) -> int:
    return {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}[dtype]


def forward_logits(folder_or_model, ids=None) -> torch.Tensor:
    ids = ids if ids is not None else torch.tensor([[1, 5, 9, 17, 33, 65, 2, 90]])
    model = folder_or_model
    if isinstance(folder_or_model, (str, Path)):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder_or_model, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()


def unmerged_logits(base_dir: Path, adapter_dir: Path, resize_to=None) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if resize_to:
        model.resize_token_embeddings(resize_to)
    return forward_logits(peft.PeftModel.from_pretrained(model, adapter_dir))


def run_cli(*args):
    """The command line in this process, arguments as strings."""
    from click.testing import CliRunner

    from lora_merge.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def expect_error(r, *fragments, code=1):
    """One ``error: …`` line (and a hint), the exit code, no traceback, and each fragment in the text."""
    assert r.exit_code == code, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and "Traceback" not in r.output, r.output
    for f in fragments:
        assert f in r.output, r.output


# the command line in a child process whose progress bar waits a little at each tensor written: a merge of a small
# model stays in flight long enough to be interrupted where a test means to, however fast the machine
PACED = """
import sys, time
import lora_merge.progress


class Paced:
    def __init__(self, *args, **kwargs):
        pass

    def update(self, n=1):
        time.sleep(PACE)

    def close(self):
        pass


lora_merge.progress.byte_bar = lambda *args, **kwargs: Paced()
from lora_merge.cli import main

sys.argv = ["lora-merge", *sys.argv[1:]]
main()
"""


def paced_cli(*args, pace: float = 0.02):
    """``lora-merge ARGS`` in a child process (a Popen with text pipes), ``pace`` seconds added per tensor written.
    The child takes Ctrl-C as a terminal would give it, even where the suite runs as a background job (whose
    children start with SIGINT ignored, and Python then never raises KeyboardInterrupt)."""
    import signal
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", PACED.replace("PACE", repr(pace)), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
