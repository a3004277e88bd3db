"""Which tokenizer and chat template OUT gets: BASE's, or the adapter's when the fine-tune brought its own.

A fine-tune often changes the chat template, and one that resized the vocabulary changes the tokenizer; either is
saved beside the adapter. By default OUT takes the adapter's tokenizer files (as a set) when the vocabulary was
resized, and the adapter's chat template when it differs from BASE's; otherwise BASE's. ``--tokenizer-from base``
keeps BASE's files whatever the adapter carries, ``--tokenizer-from adapter`` takes the adapter's. An adapter that
carries a chat template but no tokenizer of its own gives OUT its template and BASE's tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import WrongInputError
from .paths import is_regular, read_text

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", *TEMPLATE_FILES,
)
# a tokenizer of its own, as opposed to a chat template alone
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


@dataclass(frozen=True)
class TokenizerChoice:
    """The files of the adapter's folder that replace BASE's in OUT (``taken``), BASE's tokenizer files left out for
    them (``dropped``), and a line saying why, for the summary (None: all of BASE's)."""

    folder: Path
    taken: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    note: str | None = None

    @property
    def skipped(self) -> frozenset[str]:
        """BASE's files not copied: taken from the adapter instead, or dropped."""
        return frozenset(self.taken) | frozenset(self.dropped)


def choose_tokenizer(base: Path, adapter: Path, tokenizer_from: str | None, resized: bool) -> TokenizerChoice:
    """What OUT's tokenizer files are (see the module's text)."""
    own = [n for n in TOKENIZER_FILES if is_regular(adapter / n)]
    if tokenizer_from == "adapter" and not own:
        raise WrongInputError("--tokenizer-from adapter: the adapter's folder holds no tokenizer or chat template files",
                              "save the tokenizer beside the adapter (tokenizer.save_pretrained), or leave the option "
                              "out to keep BASE's")
    if tokenizer_from == "base" or not own:
        return TokenizerChoice(base)
    template = chat_template(adapter)
    differs = template is not None and template != chat_template(base)
    if tokenizer_from == "adapter":
        why = "asked for (--tokenizer-from adapter)"
    elif resized and any(n in VOCABULARY_FILES for n in own):
        why = "the vocabulary was resized"
    elif differs:
        why = "its chat template differs from BASE's; --tokenizer-from base keeps BASE's"
    else:
        return TokenizerChoice(base)
    base_files = [n for n in TOKENIZER_FILES if is_regular(base / n)]
    if any(n in VOCABULARY_FILES for n in own):  # a tokenizer of its own: replaces BASE's as a set
        taken, dropped, what = own, [n for n in base_files if n not in own], "tokenizer"
    else:  # a chat template alone (in a template file, or in a tokenizer_config.json): BASE's tokenizer otherwise
        taken = [n for n in own if n in TEMPLATE_FILES] or own
        dropped = [n for n in TEMPLATE_FILES if n in base_files and n not in taken]  # BASE's would take precedence
        what = "chat template"
    return TokenizerChoice(adapter, tuple(taken), tuple(dropped), f"{what}: the adapter's ({why})")


def chat_template(folder: Path) -> str | None:
    """The folder's chat template as transformers reads it: ``chat_template.jinja``, else ``chat_template.json``,
    else the ``chat_template`` of ``tokenizer_config.json`` (a named set of templates as sorted JSON)."""
    if is_regular(folder / "chat_template.jinja"):
        return read_text(folder / "chat_template.jinja")
    for name in ("chat_template.json", "tokenizer_config.json"):
        if is_regular(folder / name):
            try:
                value = json.loads(read_text(folder / name)).get("chat_template")
            except (ValueError, AttributeError):
                continue  # not ours to judge: the file is copied as it is
            if value is not None:
                return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return None
