"""The files around the weights: a vision-language base's processor files, and the adapter's chat template."""

import json
import shutil

import pytest
import torch
from architectures import auto_class, tiny_config
from helpers import build_adapter, peft, run_cli, transformers
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tokenizer_models

from lora_merge import merge

BASE_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
TUNED_TEMPLATE = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"


def tokenizer(template: str | None):
    """A real (tiny) fast tokenizer, built offline, with ``template`` as its chat template."""
    vocabulary = {"[UNK]": 0, "hello": 1, "world": 2, "<|user|>": 3}
    core = Tokenizer(tokenizer_models.WordLevel(vocabulary, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def chat(models, tmp_path_factory):
    """A base with a tokenizer and its chat template, and an adapter trained on it."""
    root = tmp_path_factory.mktemp("chat")
    base = root / "base"
    shutil.copytree(models["llama"], base)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (base / f).unlink()
    tokenizer(BASE_TEMPLATE).save_pretrained(base)
    build_adapter(base, root / "adapter", r=4, target_modules=["q_proj", "v_proj"])
    return base, root / "adapter"


def with_tokenizer(adapter, folder, template, whole=True):
    """A copy of ``adapter`` saved with a tokenizer (``whole``) or its chat template file alone."""
    shutil.copytree(adapter, folder)
    tok = tokenizer(template)
    if whole:
        tok.save_pretrained(folder)
    else:
        (folder / "chat_template.jinja").write_text(template)
    return folder


def loaded_template(folder) -> str:
    return transformers.AutoTokenizer.from_pretrained(folder).chat_template


def test_the_adapters_chat_template_wins_and_is_said(chat, tmp_path):
    base, adapter = chat
    tuned = with_tokenizer(adapter, tmp_path / "tuned", TUNED_TEMPLATE)
    r = run_cli("merge", base, tuned, tmp_path / "out", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "its chat template differs from BASE's; --tokenizer-from base keeps BASE's" in r.output
    assert loaded_template(tmp_path / "out") == TUNED_TEMPLATE
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["checks"]["files"]["ok"] and report["files"]["copied"]["chat_template.jinja"]["from"] == "ADAPTER"

    r = run_cli("merge", base, tuned, tmp_path / "kept", "--device", "cpu", "--tokenizer-from", "base")
    assert r.exit_code == 0, r.output
    assert loaded_template(tmp_path / "kept") == BASE_TEMPLATE and "chat template" not in r.output
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "kept" / f).read_bytes() == (base / f).read_bytes(), f


def test_a_template_alone_comes_with_the_bases_tokenizer(chat, tmp_path):
    base, adapter = chat
    tuned = with_tokenizer(adapter, tmp_path / "tuned", TUNED_TEMPLATE, whole=False)
    result = merge(base, tuned, tmp_path / "out", device="cpu")
    assert result.report.ok
    assert any(n.startswith("chat template: the adapter's") for n in result.summary()["notes"])
    assert loaded_template(tmp_path / "out") == TUNED_TEMPLATE
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out")("hello world")["input_ids"] == [1, 2]


def test_the_same_template_keeps_the_bases_files(chat, tmp_path):
    base, adapter = chat
    same = with_tokenizer(adapter, tmp_path / "same", BASE_TEMPLATE)
    result = merge(base, same, tmp_path / "out", device="cpu")
    assert result.report.ok and not any("template" in n or "tokenizer" in n for n in result.summary()["notes"])
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "out" / f).read_bytes() == (base / f).read_bytes(), f


def test_tokenizer_from_adapter_needs_one(chat, tmp_path):
    base, adapter = chat
    r = run_cli("merge", base, adapter, tmp_path / "out", "--device", "cpu", "--tokenizer-from", "adapter")
    assert r.exit_code == 1 and r.output.startswith("error: --tokenizer-from adapter: the adapter's folder holds no"), \
        r.output
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


PROCESSORS = {
    "qwen2_5_vl": ("Qwen2VLImageProcessor", "Qwen2_5_VLProcessor"),
    "llava": ("CLIPImageProcessor", "LlavaProcessor"),
}


@pytest.mark.parametrize("model_type", sorted(PROCESSORS))
def test_a_vision_language_bases_processor_files_are_in_out(model_type, tmp_path):
    torch.manual_seed(0)
    base = tmp_path / "base"
    try:  # transformers' own work, before lora-merge is involved
        model = getattr(transformers, auto_class(model_type)).from_config(tiny_config(model_type))
        model.to(torch.bfloat16).save_pretrained(base, max_shard_size="40KB")
        image, processor = PROCESSORS[model_type]
        getattr(transformers, image)().save_pretrained(base)  # preprocessor_config.json
    except Exception as e:  # noqa: BLE001 - whatever the family's own code raises
        pytest.skip(f"transformers {transformers.__version__} cannot build a tiny {model_type}: {e}")
    # the rest of what a processor's save_pretrained writes beside it (a processor needs a real tokenizer)
    (base / "processor_config.json").write_text(json.dumps({"processor_class": processor}))
    (base / "video_preprocessor_config.json").write_text(json.dumps({"video_processor_type": "Qwen2VLVideoProcessor"}))
    (base / "chat_template.json").write_text(json.dumps({"chat_template": BASE_TEMPLATE}))
    tokenizer(None).save_pretrained(base)
    torch.manual_seed(1)
    loaded = getattr(transformers, auto_class(model_type)).from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    peft.get_peft_model(loaded, config).save_pretrained(tmp_path / "adapter")
    result = merge(base, tmp_path / "adapter", tmp_path / "out", device="cpu")
    assert result.report.ok
    for f in ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
              "chat_template.json", "tokenizer.json"):
        assert (tmp_path / "out" / f).read_bytes() == (base / f).read_bytes(), f
        assert result.report.details["files"]["copied"][f]["from"] == "BASE", f
    image = transformers.AutoImageProcessor.from_pretrained(tmp_path / "out")
    assert type(image).__name__.startswith(PROCESSORS[model_type][0])
