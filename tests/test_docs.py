"""The docs stay true: the module map is the modules' own, every path they name exists, every documented command
line parses, the format versions are the code's, and every command's --help carries examples."""
from __future__ import annotations

import re
import shlex

import pytest

from module_map import ROOT, current, modules, render, summary

from img2prompt.cli import build_parser
from img2prompt.index import layout

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
PATH = re.compile(r"`((?:img2prompt|index|build_index|query|tests|bench)/[\w/]+\.(?:py|sh|html))`")


def test_module_map_is_generated_from_the_modules():
    assert current() == render(), "stale module map: run `python tests/module_map.py`"


def test_every_module_says_its_job():
    assert [str(path.relative_to(ROOT)) for path in modules().values() if not summary(path)] == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_path_the_docs_name_exists(doc):
    named = set(PATH.findall(doc.read_text(encoding="utf-8")))
    assert sorted(path for path in named if not (ROOT / path).exists()) == []


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every `img2prompt ...` line inside a fenced block of README.md and docs/ (continuations joined)."""
    found = []
    for doc in DOCS:
        for block in FENCE.findall(doc.read_text(encoding="utf-8")):
            for line in block.replace("\\\n", " ").splitlines():
                for part in re.split(r"\s*(?:&&|;|\|)\s*", line):
                    if not re.match(r"(?:[A-Z_][A-Z0-9_]*=\S*\s+)*img2prompt\s", part.strip()):
                        continue
                    words = shlex.split(part, comments=True)
                    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                        words = words[1:]  # VAR=value before the command
                    if words[:1] == ["img2prompt"] and len(words) > 1:
                        found.append((f"{doc.name}: {part.strip()}", words[1:]))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_parses(where, argv, capsys):
    try:
        build_parser().parse_args(argv)
    except SystemExit as stop:
        pytest.fail(f"{where} does not parse: {capsys.readouterr().err.strip().splitlines()[-1:]}")


def test_format_versions_in_the_docs_are_the_codes():
    text = " ".join((ROOT / "docs" / "index-format.md").read_text(encoding="utf-8").split())
    written = re.search(r"`FORMAT_VERSION` = \*\*(\d+)\*\*", text)
    readable = re.search(r"`READABLE_VERSIONS` = \(([\d, ]+)\)", text)
    assert written and int(written.group(1)) == layout.FORMAT_VERSION
    assert readable and tuple(int(v) for v in readable.group(1).split(",")) == tuple(layout.READABLE_VERSIONS)


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(action.choices.items())


@pytest.mark.parametrize("name, sub", _subcommands(), ids=[name for name, _ in _subcommands()])
def test_every_command_help_has_examples(name, sub):
    assert f"img2prompt {name} " in (sub.epilog or ""), f"`img2prompt {name} --help` shows no example"
