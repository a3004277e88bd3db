"""The Hub, both directions, against a local server that speaks the Hub's HTTP API.

The real huggingface_hub client runs in a child process pointed at the server with HF_ENDPOINT, as
a user's `lora-merge` would; nothing reaches the internet.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import build_adapter
from hub_server import FakeHub

BASE_CARD = b"---\nlicense: apache-2.0\nlanguage: en\n---\n# The base model\n"


@pytest.fixture(scope="module")
def hub(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    server = FakeHub().start()
    base = models["llama_sharded"]
    server.add_repo(
        "org/base",
        base,
        files={
            "README.md": BASE_CARD,
            "pytorch_model.bin": b"pickled weights a merge must never download",
            "original/consolidated.pth": b"a subfolder the merge does not need",
        },
    )
    build_adapter(base, root / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/base"
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    server.add_repo("org/adapter", root / "adapter")
    server.add_repo("org/pickles", files={"config.json": b"{}", "pytorch_model.bin": b"x"})
    server.add_repo("org/gated", base, gated=True)
    config["base_model_name_or_path"] = "other/model"
    server.add_repo(
        "org/adapter-for-other", root / "adapter", files={"adapter_config.json": json.dumps(config).encode()}
    )
    server.local_adapter = root / "adapter"
    yield server
    server.stop()


def run(hub, home: Path, *args, token="hf_write", endpoint=None, **env):
    """`lora-merge ARGS` in a child process with its own huggingface_hub cache in ``home``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environ.update(
        {
            "HF_ENDPOINT": endpoint or hub.endpoint,
            "HF_HOME": str(home),
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TQDM_DISABLE": "1",
            **env,
        }
    )
    if token:
        environ["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "lora_merge", *map(str, args)], env=environ, capture_output=True, text=True, timeout=300
    )


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def test_merge_from_the_hub_and_push(hub, models, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "out"
    r = run(hub, tmp_path / "home", "org/base@main", "org/adapter", out, "--push-to-hub", "me/merged")
    assert r.returncode == 0, r.stderr
    assert f"pushed to {hub.endpoint}/me/merged" in r.stdout
    assert "parity report: PASSED" in r.stdout
    # only what the merge needs was downloaded
    assert hub.downloaded("org/base") == {
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        *(p.name for p in models["llama_sharded"].glob("*.safetensors")),
    }
    # the same bytes as merging the local folders
    local = tmp_path / "local"
    assert run(hub, tmp_path / "home", models["llama_sharded"], hub.local_adapter, local, "-q").returncode == 0
    for name in (p.name for p in local.glob("*.safetensors")):
        assert (out / name).read_bytes() == (local / name).read_bytes()
    # what arrived on the Hub is byte for byte OUT
    pushed = {k: v for k, v in hub.files("me/merged").items() if k != ".gitattributes"}
    assert pushed == local_files(out)
    # provenance: the resolved commits
    report = json.loads((out / "merge_report.json").read_text())
    prov = report["provenance"]
    assert prov["base"]["repo_id"] == "org/base" and prov["base"]["revision"] == hub.repos["org/base"].branches["main"]
    assert prov["adapter"]["revision"] == hub.repos["org/adapter"].branches["main"]
    assert "--token" not in prov["command"] and prov["command"].startswith("lora-merge org/base@main org/adapter")
    # the model card parses, names the base for the Hub's model tree, and carries the base's license
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/base" and card.data.base_model_relation == "finetune"
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert {"lora", "merged"} <= set(card.data.tags)
    assert "r=4, lora_alpha=8" in card.text and prov["command"] in card.text
    assert 'from_pretrained("me/merged"' in card.text and "| untouched | pass |" in card.text
    assert hub.repos["org/base"].branches["main"][:12] in card.text
    # every link goes to the Hub's repos or to a file pushed beside the card
    for target in re.findall(r"\]\(([^)]+)\)", card.text):
        assert target.startswith("https://huggingface.co/org/") or target in pushed, target
    assert hub.unknown == []


def test_offline_mode_uses_the_cache(hub, tmp_path):
    home = tmp_path / "home"
    assert run(hub, home, "org/base", "org/adapter", tmp_path / "first", "-q").returncode == 0
    # offline, with the server out of reach: everything comes from the cache
    r = run(
        hub,
        home,
        "org/base",
        "org/adapter",
        tmp_path / "second",
        "-q",
        HF_HUB_OFFLINE="1",
        endpoint="http://127.0.0.1:9",
    )
    assert r.returncode == 0, r.stderr
    assert local_files(tmp_path / "first").keys() == local_files(tmp_path / "second").keys()
    # and what is not cached is a clear refusal
    r = run(hub, home, "org/never-fetched", "org/adapter", tmp_path / "third", HF_HUB_OFFLINE="1")
    assert r.returncode == 1
    assert "error: BASE 'org/never-fetched': no such folder here, and as a Hub repo id: offline mode (HF_HUB_OFFLINE=1) and it is not in the local cache" in r.stderr
    assert not (tmp_path / "third").exists()
    # pushing needs the network: said before anything is merged, and after, for an existing output
    r = run(hub, home, "org/base", "org/adapter", tmp_path / "fourth", "--push-to-hub", "me/merged",
            HF_HUB_OFFLINE="1")
    assert r.returncode == 1 and r.stderr.count("\n") <= 2, r.stderr
    assert "error: pushing to the Hub needs the network, and offline mode is on (HF_HUB_OFFLINE=1)" in r.stderr
    assert not (tmp_path / "fourth").exists()
    r = run(hub, home, "push", tmp_path / "second", "me/merged", HF_HUB_OFFLINE="1")
    assert r.returncode == 1 and "pushing to the Hub needs the network" in r.stderr, r.stderr


def test_push_an_existing_output_to_a_branch_and_as_a_pr(hub, tmp_path):
    out = tmp_path / "out"
    assert run(hub, tmp_path / "home", "org/base", "org/adapter", out, "-q").returncode == 0
    r = run(hub, tmp_path / "home", "push", out, "me/retry", "--revision", "dev", "--commit-message", "second try")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"pushed to {hub.endpoint}/me/retry/tree/dev"
    repo = hub.repos["me/retry"]
    assert repo.messages[repo.branches["dev"]] == "second try"
    assert {k: v for k, v in hub.files("me/retry", "dev").items() if k != ".gitattributes"} == local_files(out)
    r = run(hub, tmp_path / "home", "push", out, "me/retry", "--create-pr")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"pushed to {hub.endpoint}/me/retry/discussions/1"
    assert "refs/pr/1" in repo.branches


def test_push_refuses_an_output_that_failed(hub, tmp_path):
    out = tmp_path / "out"
    assert run(hub, tmp_path / "home", "org/base", "org/adapter", out, "-q").returncode == 0
    report = json.loads((out / "merge_report.json").read_text())
    report["status"] = "failed"
    (out / "merge_report.json").write_text(json.dumps(report))
    r = run(hub, tmp_path / "home", "push", out, "me/bad")
    assert r.returncode == 1
    assert "failed its parity checks; only a checked merge is pushed" in r.stderr
    assert "me/bad" not in hub.repos


def test_adapter_trained_on_another_base_warns(hub, tmp_path):
    r = run(hub, tmp_path / "home", "org/base", "org/adapter-for-other", tmp_path / "out", "-q")
    assert r.returncode == 0, r.stderr
    assert (
        "WARNING: the adapter was trained on 'other/model' (base_model_name_or_path) but BASE is 'org/base'" in r.stderr
    )
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert any("trained on 'other/model'" in n for n in report["notes"])


@pytest.mark.parametrize(
    "case",
    [
        "not_logged_in",
        "read_only_token",
        "no_write_access",
        "repo_not_found",
        "revision_not_found",
        "gated",
        "network_down",
        "pickles_only",
    ],
)
def test_hub_errors_are_one_line(case, hub, tmp_path):
    out = tmp_path / "out"
    args, kwargs = ["org/base", "org/adapter", out], {}
    if case == "not_logged_in":
        args, kwargs = args + ["--push-to-hub", "me/x"], {"token": None}
        expect = "error: the Hub login: not logged in to the Hub"
    elif case == "read_only_token":
        args, kwargs = args + ["--push-to-hub", "me/x"], {"token": "hf_read"}
        expect = "error: the Hub token of 'me' is read-only"
    elif case == "no_write_access":
        args = args + ["--push-to-hub", "someone-else/x"]
        expect = "error: pushing to someone-else/x: no write access (403)"
    elif case == "repo_not_found":
        args[0] = "org/missing"
        expect = "error: BASE 'org/missing': no such folder here, and as a Hub repo id: repo not found (or private)"
    elif case == "revision_not_found":
        args[0] = "org/base@v9"
        expect = "error: BASE org/base@v9: no such revision"
    elif case == "gated":
        args[0], kwargs = "org/gated", {"token": None}
        expect = "error: BASE org/gated: the repo is gated"
    elif case == "network_down":
        kwargs = {"endpoint": "http://127.0.0.1:9"}
        expect = "error: BASE 'org/base': no such folder here, and as a Hub repo id: cannot reach the Hub"
    else:
        args[0] = "org/pickles"
        expect = "error: BASE org/pickles has no safetensors weights (only pytorch_model.bin)"
    r = run(hub, tmp_path / "home", *args, **kwargs)
    assert r.returncode == 1, r.stdout
    assert r.stderr.startswith(expect), r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") <= 2  # the error and its hint
    if case == "no_write_access":
        assert out.is_dir()  # the merge itself succeeded and is kept; only the push failed
    else:
        assert not out.exists()


def test_repo_specs_and_local_paths(models, tmp_path, monkeypatch):
    import shutil

    from lora_merge.hub import wanted_files
    from lora_merge.names import parse_spec
    from lora_merge.sources import resolve_source

    assert parse_spec("Qwen/Qwen3-0.6B") == ("Qwen/Qwen3-0.6B", None)
    assert parse_spec("me/my-lora@v2") == ("me/my-lora", "v2")
    assert parse_spec("me/x@refs/pr/3") == ("me/x", "refs/pr/3")
    for not_a_repo in ["./base", "base", "/abs/path", "a/b/c", "../x/y", "org/..", "org/name@"]:
        assert parse_spec(not_a_repo) is None, not_a_repo
    # an existing local folder always wins over a repo id of the same spelling
    monkeypatch.chdir(tmp_path)
    shutil.copytree(models["llama"], tmp_path / "org" / "base")
    source = resolve_source("org/base", "BASE")
    assert source.repo_id is None and source.path == (tmp_path / "org" / "base").resolve()
    names = ["model.safetensors", "pytorch_model.bin", "config.json", "original/params.json", "model.gguf",
             "tokenizer.model", ".gitattributes", "README.md"]
    assert wanted_files(names, "BASE") == ["model.safetensors", "config.json", "tokenizer.model", "README.md"]
    assert wanted_files(["adapter_model.bin", "adapter_config.json"], "ADAPTER") == ["adapter_model.bin",
                                                                                     "adapter_config.json"]
    assert wanted_files(["adapter_model.bin", "adapter_model.safetensors", "adapter_config.json"], "ADAPTER") == [
        "adapter_model.safetensors", "adapter_config.json"]
