"""The console scripts tell the user's mistakes from the package's bugs (issue 27, "Errors").

* an :class:`~asymvlm.errors.AsymVLMError` (and the OS refusing one of the user's paths) is ONE
  line, ``"<prog>: error: <message>"``, and exit status 2;
* anything else (a plain ``ValueError`` from an internal invariant, a shape error deep in torch,
  an ``OSError`` about no file) is a bug: it propagates, so the script prints its traceback and
  exits 1.

Every console script of ``pyproject.toml`` (``[project.scripts]``, as installed) is checked, by
raising from the argument parser each of them calls (``argparse.ArgumentParser.parse_known_args``)
and, for ``asymvlm-train``, from the training run it starts after parsing. The known user errors
staying one line is the job of the fuzz tests (``tests/core/test_cli_fuzz.py``,
``tests/test_artifact_fuzz.py``, the ``*_untrusted`` tests).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from asymvlm import cli
from asymvlm.errors import (
    ArtefactError,
    AsymVLMError,
    ConfigError,
    EncoderLoadError,
    InputError,
    InputTypeError,
    MissingExtraError,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.value.startswith("asymvlm.")}


def one_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def parser_raising(monkeypatch, exc: BaseException) -> None:
    """Every argparse parser (the scripts' own, transformers' HfArgumentParser) raises ``exc``."""

    def parse_known_args(self, args=None, namespace=None):
        raise exc

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)


def test_every_console_script_is_covered():
    # the parametrised tests below run over the installed scripts: they must be pyproject's, all of them
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    declared = dict(
        (k.strip(), v.strip().strip('"'))
        for k, v in (line.split("=", 1) for line in section.splitlines() if "=" in line and line[:1] != "#")
    )
    assert {name: ep.value for name, ep in SCRIPTS.items()} == declared
    assert len(declared) >= 7  # demo, eval, train, federate, merge, serve, index


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_an_internal_value_error_keeps_its_traceback(script, monkeypatch, capsys):
    main = SCRIPTS[script].load()
    parser_raising(monkeypatch, ValueError("internal"))
    with pytest.raises(ValueError, match="^internal$") as info:
        main(["--output_dir", "never-used"])
    assert not isinstance(info.value, AsymVLMError)
    assert f"{script}: error" not in capsys.readouterr().err  # no one-line verdict on a bug


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_package_error_is_one_line_and_status_2(script, monkeypatch, capsys):
    main = SCRIPTS[script].load()
    parser_raising(monkeypatch, ConfigError("lr must be > 0,\n  got -1"))
    assert main([]) == 2
    assert one_line(capsys, script) == f"{script}: error: lr must be > 0, got -1"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_an_os_error_about_a_user_path_is_one_line(script, monkeypatch, capsys):
    main = SCRIPTS[script].load()
    parser_raising(monkeypatch, PermissionError(13, "Permission denied", "/root/out"))
    assert main([]) == 2
    assert one_line(capsys, script) == f"{script}: error: [Errno 13] Permission denied: '/root/out'"


@pytest.mark.parametrize(
    "exc",
    [
        ConfigError("bad option"),
        InputError("row 3 contains NaN or inf"),
        InputTypeError("row 1: captions must be a string or a list of strings, got int"),
        ArtefactError("corrupt JSON in x.json"),
        EncoderLoadError("could not load open_clip 'ViT-B-32': offline"),
        MissingExtraError("backend='faiss' needs FAISS: pip install 'asymvlm[faiss]'"),
        FileNotFoundError(2, "No such file or directory", "cache/manifest.json"),
        FileNotFoundError("no model at runs/x (asymvlm writes model/config.json)"),
        IsADirectoryError(21, "Is a directory", "out"),
        NotADirectoryError(20, "Not a directory", "file/x"),
        FileExistsError(17, "File exists", "out"),
        OSError(36, "File name too long", "x" * 300),
        OSError(30, "Read-only file system", "/ro/out"),
        OSError(28, "No space left on device"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_user_errors(exc, capsys):
    assert cli.is_user_error(exc)

    def body(argv):
        raise exc

    assert cli.run("prog", body, []) == 2
    one_line(capsys, "prog")


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("internal"),
        TypeError("internal"),
        KeyError("internal"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
        FloatingPointError("the encoder produced a non-finite text embedding (row 0)"),
        ConnectionResetError(104, "Connection reset by peer"),
        BrokenPipeError(32, "Broken pipe"),
        OSError("an OSError about no file"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_bugs_propagate(exc, capsys):
    assert not cli.is_user_error(exc)

    def body(argv):
        raise exc

    with pytest.raises(type(exc)):
        cli.run("prog", body, [])
    assert "prog: error" not in capsys.readouterr().err


def test_a_plain_value_error_after_parsing_keeps_its_traceback(monkeypatch, capsys, tmp_path):
    # the bug is raised inside the training run, after a configuration that parses
    import asymvlm.training.loop as loop

    def train(cfg, *args, **kwargs):
        raise ValueError("internal")

    monkeypatch.setattr(loop, "train", train)
    main = SCRIPTS["asymvlm-train"].load()
    with pytest.raises(ValueError, match="^internal$"):
        main(["--cache_dir", str(tmp_path / "missing"), "--dataset", "shapeworld", "--output_dir", str(tmp_path / "o")])
    assert "asymvlm-train: error" not in capsys.readouterr().err


def test_a_torch_shape_error_deep_in_a_command_keeps_its_traceback(monkeypatch, tmp_path):
    import torch

    import asymvlm.training.loop as loop

    def train(cfg, *args, **kwargs):
        return torch.zeros(2, 3) @ torch.zeros(4, 5)  # RuntimeError from torch, not the user's

    monkeypatch.setattr(loop, "train", train)
    main = SCRIPTS["asymvlm-train"].load()
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        main(["--cache_dir", str(tmp_path / "missing"), "--dataset", "shapeworld", "--output_dir", str(tmp_path / "o")])


RAISING_SCRIPT = """
import argparse, sys
from asymvlm.errors import ConfigError
kind = sys.argv[1]
def parse_known_args(self, args=None, namespace=None):
    raise ValueError("internal") if kind == "bug" else ConfigError("bad option")
argparse.ArgumentParser.parse_known_args = parse_known_args
from asymvlm.merging.cli import main
raise SystemExit(main([]))
"""


@pytest.mark.parametrize("kind", ["bug", "user"])
def test_the_process_status_and_stderr(kind):
    # what a user sees in a shell: a bug prints Python's traceback and exits 1; a user error one line, exit 2
    proc = subprocess.run(
        [sys.executable, "-c", RAISING_SCRIPT, kind], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    if kind == "bug":
        assert proc.returncode == 1, proc.stderr
        assert "Traceback (most recent call last)" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == "ValueError: internal"
        assert "asymvlm-merge: error" not in proc.stderr
    else:
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == ["asymvlm-merge: error: bad option"]
