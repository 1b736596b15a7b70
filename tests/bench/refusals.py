"""The one way the bench tests read a refusal: argparse's exit code 2 and the last line of stderr, which starts with
the program's name."""

import importlib
import sys

import pytest


def refused_line(module: str, flags, monkeypatch, capsys, parse=None) -> str:
    """The one line bench/<module>.py's parser exits with on these flags (code 2, `<module>.py: error: ...`).

    parse: what parses the flags (default: the module's parse_args, else its main); one without parameters reads
    sys.argv, which is set either way (argparse's errors start with the program name it holds)."""
    if parse is None:
        B = importlib.import_module(f"bench.{module}")
        parse = B.parse_args if hasattr(B, "parse_args") else B.main
    monkeypatch.setattr(sys, "argv", [f"{module}.py", *flags])
    with pytest.raises(SystemExit) as e:
        parse(flags) if parse.__code__.co_argcount else parse()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err and err[-1].startswith(f"{module}.py: error: "), (e.value.code, err[-1:])
    return err[-1]
