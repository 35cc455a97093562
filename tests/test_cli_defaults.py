"""The CLI writes no default of its own for build, add and merge: a flag left out leaves its option at the options
dataclass's default, and --help shows that default."""
from __future__ import annotations

import contextlib
import dataclasses
import io

import pytest

from img2prompt import cli

CASES = {
    "build": (["build", "corpus.txt", "--out", "out", "--clip-model", "m"], "img2prompt.build_index.runner",
              "BuildOptions"),
    "add": (["add", "index", "more.txt"], "img2prompt.build_index.add", "AddOptions"),
    "merge": (["merge", "a", "b", "--out", "out"], "img2prompt.build_index.merge", "MergeOptions"),
}


class Called(Exception):
    """Stops the command at its API call, with the keyword options it passed."""


def _defaults(module: str, name: str) -> dict:
    import importlib

    options = getattr(importlib.import_module(module), name)
    return {field.name: field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
            for field in dataclasses.fields(options)
            if not (field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING)}


@pytest.mark.parametrize("command", sorted(CASES))
def test_flags_left_out_keep_the_options_defaults(command, monkeypatch):
    argv, module, name = CASES[command]
    import img2prompt.api as api

    def called(*_args, **options):
        raise Called(options)

    monkeypatch.setattr(api, command, called)
    args = cli.build_parser().parse_args(argv)
    with pytest.raises(Called) as raised:
        cli.COMMANDS[command](args)
    passed, defaults = raised.value.args[0], _defaults(module, name)
    passed.pop("engine_options", None)  # each engine's own flags: their defaults are the engine registry's
    passed.pop("clip_model", None)  # given on the command line (build requires it)
    assert passed == {key: defaults[key] for key in passed}


def test_help_shows_the_options_defaults():
    defaults = _defaults("img2prompt.build_index.runner", "BuildOptions")
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown), pytest.raises(SystemExit):
        cli.build_parser().parse_args(["build", "--help"])
    text = " ".join(shown.getvalue().split())
    assert f"the unit of resume (default {defaults['shard_size']})" in text
    assert f"encoder batch size (default {defaults['batch_size']})" in text
    assert f"longer than this (default {defaults['max_chars']})" in text
