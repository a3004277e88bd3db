"""The README's and the docs' examples, so that they do not drift: those that run offline run, on a tiny model under
the names they use, and print what the samples below them show (in shape: numbers and paths differ); every other
`lora-merge` line names only options its command has, with values it takes; every link between the pages leads
to a page and a heading that exist; the JSON report's keys are the ones the docs list."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from make_model import make_adapter, make_base

from lora_merge.cli import cli

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TINY = dict(hidden=128, inter=256, layers=2, heads=2, kv=2, head_dim=64, vocab=256)  # sides of whole FP8 blocks
COMMANDS = ("merge", "verify", "unmerge", "push")
RUNS = {"README.md": 6, "commands.md": 7, "adapters.md": 2, "report.md": 1, "quantized.md": 1}  # lora-merge lines run


def fenced(page: Path) -> list[tuple[str, str, bool]]:
    """The page's fenced blocks in order: (language, text, whether it follows the block before with nothing
    between them)."""
    found, end = [], None
    for m in re.finditer(r"^```(\w*)\n(.*?)^```\n?", page.read_text(), flags=re.S | re.M):
        found.append((m[1], m[2], end is not None and not m.string[end:m.start()].strip()))
        end = m.end()
    return found


def command_lines(text: str) -> list[list[str]]:
    """The `lora-merge` lines of a shell block, split as the shell would (comments dropped)."""
    return [shlex.split(line, comments=True)[1:] for line in text.splitlines() if line.startswith("lora-merge ")]


def parsed(args: list[str]) -> tuple[str, dict]:
    """The subcommand and its parameters as click parses them (a usage error fails the test)."""
    name = args[0] if args and args[0] in COMMANDS else "merge"
    rest = args[1:] if args and args[0] in COMMANDS else args
    command = cli.commands[name]
    with command.make_context(name, list(rest), resilient_parsing=False) as ctx:
        return name, dict(ctx.params)


def inputs_outputs(name: str, params: dict) -> tuple[list[str], list[str]]:
    """The paths a command reads and the ones it writes."""
    adapters = [a.rpartition(":")[0] if ":" in a and not Path(a).exists() else a for a in params.get("adapters", ())]
    if name == "merge":
        paths = list(params["paths"])
        return paths[:-1] + adapters, paths[-1:]
    if name == "verify":
        return [params["out"], params["base"], *adapters], [params["report_path"]] if params["report_path"] else []
    if name == "unmerge":
        return [params["merged"], params["adapter"]] + ([params["original"]] if params["original"] else []), \
            [params["out"]]
    return [params["out"]], []


def runnable(name: str, params: dict, here: Path) -> bool:
    """Whether the example runs here: every input a local path that exists, nothing that needs the Hub, a GPU or
    the latency extra."""
    read, _ = inputs_outputs(name, params)
    if name == "push" or params.get("repo_id") or params.get("latency"):
        return False
    if str(params.get("device", "auto")).startswith(("cuda", "mps")):
        return False
    return all(p.startswith("./") and (here / p).exists() for p in read)


def shape(sample: str) -> re.Pattern:
    """A sample line as a pattern: its absolute paths and its numbers stand for any."""
    text = re.sub(r"/[^\s)]+", "\0P", sample.rstrip())
    text = re.sub(r"-?\d[\d,]*(\.\d+)?", "\0N", text)
    text = re.escape(text).replace("\0P", r"/\S+?").replace("\0N", r"-?\d[\d,]*(\.\d+)?")
    return re.compile(text + r"\s*")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The names the examples use: a Qwen3-shaped base of three shards, its adapter, a second one, and their merge."""
    from lora_merge import merge

    root = tmp_path_factory.mktemp("docs-models")
    make_base(TINY, root / "Qwen3-0.6B", shards=3)
    make_adapter(TINY, root / "my-qwen3-lora", root / "Qwen3-0.6B", rank=16)
    make_adapter(TINY, root / "style-lora", root / "Qwen3-0.6B", rank=8, seed=2)
    merge(root / "Qwen3-0.6B", root / "my-qwen3-lora", root / "qwen3-merged", device="cpu")
    return root


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_examples_run_and_print_what_they_show(page, models, tmp_path, monkeypatch):
    here = tmp_path / "here"
    shutil.copytree(models, here)
    monkeypatch.chdir(here)
    ran = 0
    blocks = fenced(page)
    for k, (language, text, _) in enumerate(blocks):
        if language == "python":
            exec(compile(text, f"{page.name}, block {k}", "exec"), {"__name__": "__doc_example__"})
            continue
        if language != "bash":
            continue
        lines = command_lines(text)
        for args in lines:
            name, params = parsed(args)
            if not runnable(name, params, here):
                continue
            for out in inputs_outputs(name, params)[1]:  # each example stands alone: its OUT is its own
                if Path(out).is_dir() and name == "merge" and not params.get("overwrite") and not params["dry_run"]:
                    shutil.rmtree(out)
            r = CliRunner().invoke(cli, args)
            assert r.exit_code == 0, (page.name, args, r.output)
            ran += 1
            below = blocks[k + 1] if k + 1 < len(blocks) else None
            sample = below[1] if len(lines) == 1 and below is not None and below[0] == "text" and below[2] else None
            if sample is not None:  # the sample below the command: line for line, in shape
                got = r.stdout.rstrip("\n").splitlines()
                want = sample.rstrip("\n").splitlines()
                assert len(got) == len(want), (page.name, args, r.stdout)
                for g, w in zip(got, want):
                    assert shape(w).fullmatch(g), (page.name, w, g)
    assert ran == RUNS.get(page.name, 0), ran  # the examples that run here, so that none stops running unseen


def test_the_links_between_the_pages_lead_somewhere():
    def anchors(page: Path) -> set[str]:
        text = page.read_text()
        heads = re.findall(r"^#+ (.+)$", text, flags=re.M)
        slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}
        return slugs | set(re.findall(r'<a id="([^"]+)">', text))

    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"\w+://", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path)):
                broken.append(f"{page.name}: {target}")
    assert not broken, broken


def test_the_json_report_has_the_keys_the_docs_list(models, tmp_path):
    from lora_merge import merge

    documented = re.search(r"^## The JSON report\n(.*?)(^## |\Z)", (ROOT / "docs" / "report.md").read_text(),
                           flags=re.S | re.M)[1]
    keys = set(re.findall(r"^\| `(\w+)` \|", documented, flags=re.M))
    report = merge(models / "Qwen3-0.6B", models / "my-qwen3-lora", tmp_path / "out", device="cpu").report.to_json()
    assert set(report) <= keys and keys - set(report) == {"round_trip", "latency"}
    assert json.loads((tmp_path / "out" / "merge_report.json").read_text()).keys() == report.keys()


def test_every_option_the_docs_tables_name_exists():
    """The option tables of the commands page: each option a flag of its command."""
    text = (ROOT / "docs" / "commands.md").read_text()
    for section in ("merge", "verify"):
        table = re.search(rf"^## {section}\n(.*?)^## ", text, flags=re.S | re.M)[1]
        flags = {f for row in re.findall(r"^\| (.+?) \|", table, flags=re.M) for f in re.findall(r"`(--?[\w-]+)", row)}
        known = {o for p in cli.commands[section].params if isinstance(p, click.Option) for o in p.opts}
        assert flags and flags <= known, (section, sorted(flags - known))
