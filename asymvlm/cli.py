"""One dialect for the console scripts (``asymvlm-demo``, ``-train``, ``-federate``, ``-merge``, ``-eval``,
``-serve``, ``-index``): each ``main`` is ``run(prog, body, argv)``.

* :func:`run` runs a script's body and turns every user error (:func:`is_user_error`) into ONE
  line on stderr, ``"<prog>: error: <message>"``, and exit status 2 (never a traceback): any
  :class:`~asymvlm.errors.AsymVLMError` (parse errors are :class:`~asymvlm.errors.ConfigError`)
  and the OS refusing one of the user's paths (``FileNotFoundError``, ``PermissionError``,
  ``IsADirectoryError``, ``NotADirectoryError``, ``FileExistsError``, or any ``OSError`` naming a
  file, a full disk, a read-only file system). ``KeyboardInterrupt`` is status 130. Anything else
  is a bug and keeps its traceback: a plain ``ValueError`` from deep in torch included.
* :func:`setup_logging`: library code logs through :mod:`logging` (loggers ``asymvlm.*``); the
  scripts show those messages on stderr as ``"<prog>: <message>"`` at INFO, and under
  ``accelerate launch`` / torchrun only rank 0 does (other ranks: warnings and errors only).
* :func:`make_parser`: the argparse parser of the plain scripts (merge, eval, demo): every long
  flag spelled with underscores or dashes (``--output_dir`` / ``--output-dir``), no prefix
  abbreviations (``--dens`` is not ``--density``), defaults and choices in ``--help``, the epilog
  printed as written, and parse errors raised as :class:`~asymvlm.errors.ConfigError`. The
  dataclass scripts (train, federate) use :func:`dataclass_parser` / :func:`parse_dataclass_args`
  (``asymvlm.config``: ``transformers.HfArgumentParser`` with the same conventions).

Example:
    >>> p = make_parser("demo-cli")
    >>> _ = p.add_argument("--output_dir", default="out", help="where to write")
    >>> p.parse_args(["--output-dir", "x"]).output_dir
    'x'
    >>> def body(argv):
    ...     make_parser("demo-cli").parse_args(argv)
    ...     return 0
    >>> import contextlib, io
    >>> err = io.StringIO()
    >>> with contextlib.redirect_stderr(err):
    ...     code = run("demo-cli", body, ["--nope"])
    >>> code, err.getvalue()
    (2, 'demo-cli: error: unrecognized arguments: --nope; see demo-cli --help\\n')
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from asymvlm.config import HelpFormatter, parse_dataclass_args
from asymvlm.config import argument_parser as dataclass_parser
from asymvlm.errors import AsymVLMError, ConfigError

__all__ = [
    "USER_ERRORS",
    "ArgumentParser",
    "HelpFormatter",
    "comma_choices",
    "dataclass_parser",
    "error_line",
    "help_requested",
    "is_main_process",
    "is_user_error",
    "make_parser",
    "parse_dataclass_args",
    "run",
    "setup_logging",
    "summary",
]

# What a user can cause: the package's own errors (a bad option, input or artefact is raised as
# an AsymVLMError where it is found) and the OS refusing one of the user's paths. A plain
# ValueError / TypeError / RuntimeError is a bug and keeps its traceback (see is_user_error).
USER_ERRORS: tuple[type[BaseException], ...] = (
    AsymVLMError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)
# errno values that are about the user's disk, not about the program, even without a file name
_USER_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.ENAMETOOLONG) if code
)

_HANDLER_NAME = "asymvlm.cli"


def is_main_process() -> bool:
    """False on the non-zero ranks of ``accelerate launch`` / torchrun (``RANK`` or ``LOCAL_RANK`` != 0)."""
    return all(os.environ.get(var, "0").strip() in ("", "0") for var in ("RANK", "LOCAL_RANK"))


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment (a test's captured stream, a redirected one)."""

    def __init__(self, level: int = logging.NOTSET):
        logging.Handler.__init__(self, level)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr


def setup_logging(prog: str, level: int | None = None) -> logging.Logger:
    """Show the ``asymvlm`` loggers on stderr as ``"<prog>: <message>"``.

    Level INFO on rank 0 (or without a launcher), WARNING on the other ranks; ``level`` overrides
    both. Calling it again (a test calling ``main`` twice) replaces the handler, never stacks it.
    Returns the ``asymvlm`` logger.
    """
    logger = logging.getLogger("asymvlm")
    for h in list(logger.handlers):
        if h.get_name() == _HANDLER_NAME:
            logger.removeHandler(h)
    handler = _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level if level is not None else (logging.INFO if is_main_process() else logging.WARNING))
    return logger


def error_line(prog: str, err: BaseException) -> str:
    """``"<prog>: error: <message>"`` on one line (the message's whitespace collapsed)."""
    message = " ".join(str(err).split()) or type(err).__name__
    if (
        isinstance(err, OSError)
        and not isinstance(err, AsymVLMError)
        and err.filename
        and str(err.filename) not in message
    ):
        message = f"{message}: {err.filename}"
    return f"{prog}: error: {message}"


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is the user's to fix (one line, status 2) rather than a bug (a traceback).

    The user's: every :class:`~asymvlm.errors.AsymVLMError`; the path errors of
    :data:`USER_ERRORS`; any other ``OSError`` that names a file (``File name too long: 'x'``,
    ``Read-only file system: 'out'``) or is about the disk (full, over quota, read-only).
    Not the user's: everything else, among them a plain ``ValueError`` (the package raises its
    own errors for bad values) and an ``OSError`` about no file (a refused connection, a broken pipe).

    Example:
        >>> from asymvlm.errors import ConfigError
        >>> is_user_error(ConfigError("lr must be > 0")), is_user_error(ValueError("internal"))
        (True, False)
        >>> is_user_error(OSError(36, "File name too long", "x" * 300)), is_user_error(ConnectionResetError())
        (True, False)
    """
    if isinstance(err, USER_ERRORS):
        return True
    return isinstance(err, OSError) and (err.filename is not None or err.errno in _USER_ERRNOS)


def run(prog: str, body: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``body(argv)`` as the console script ``prog`` and return its exit status.

    Sets up logging (:func:`setup_logging`; undone on return), then: the body's return value
    (``None`` is 0); a user error (:func:`is_user_error`) is one line ``"<prog>: error: <message>"``
    on stderr and status 2; ``KeyboardInterrupt`` is status 130; ``SystemExit`` (argparse's
    ``--help``) returns its code. Other exceptions are bugs and propagate with their traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    logger = logging.getLogger("asymvlm")
    saved_level, saved_handlers = logger.level, list(logger.handlers)
    setup_logging(prog)
    try:
        return _run(prog, body, argv)
    finally:  # a script called from Python (tests, notebooks) leaves logging as it found it
        logger.handlers[:] = saved_handlers
        logger.setLevel(saved_level)


def _run(prog: str, body: Callable[[list[str]], int | None], argv: list[str]) -> int:
    try:
        code = body(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return int(exit_.code or 0)
        print(error_line(prog, ConfigError(str(exit_.code))), file=sys.stderr)
        return 2
    except Exception as err:
        if not is_user_error(err):
            raise  # a bug: its traceback is the report
        print(error_line(prog, err), file=sys.stderr)
        return 2
    return 0 if code is None else int(code)


def summary(doc: str | None) -> str:
    """The first line of a script's docstring, for ``--help`` (reST literals unquoted).

    Example:
        >>> summary("``asymvlm-x``: do things.\\n\\nMore.")
        'asymvlm-x: do things.'
    """
    return (doc or "").strip().splitlines()[0].replace("``", "") if (doc or "").strip() else ""


def help_requested(argv: Iterable[str]) -> bool:
    """Whether ``-h`` / ``--help`` is among the arguments (before a ``--``)."""
    for a in argv:
        if a == "--":
            return False
        if a in ("-h", "--help"):
            return True
    return False


def _spellings(flag: str) -> list[str]:
    """``--lam_grid`` -> ``[--lam_grid, --lam-grid]`` (the given spelling first)."""
    if not flag.startswith("--"):
        return [flag]
    name = flag[2:]
    out = [flag]
    for alt in (name.replace("-", "_"), name.replace("_", "-")):
        if f"--{alt}" not in out:
            out.append(f"--{alt}")
    return out


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` in the house dialect (see :func:`make_parser`)."""

    def add_argument(self, *flags: str, **kwargs: Any) -> argparse.Action:
        spelled: list[str] = []
        for flag in flags:
            spelled += [f for f in _spellings(flag) if f not in spelled]
        return super().add_argument(*spelled, **kwargs)

    def error(self, message: str):  # argparse would print the usage and exit 2
        raise ConfigError(f"{message}; see {self.prog} --help")


def make_parser(prog: str, description: str = "", epilog: str = "") -> ArgumentParser:
    """The parser of a plain argparse console script: both spellings of every long flag,
    ``allow_abbrev=False``, defaults and choices in ``--help`` (:class:`HelpFormatter`), and a
    parse error raised as :class:`~asymvlm.errors.ConfigError` (``run`` prints it as one line)."""
    return ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter, allow_abbrev=False
    )


def comma_choices(allowed: Sequence[str], everything: str = "all") -> Callable[[str], tuple[str, ...]]:
    """An argparse ``type``: a comma-separated list of ``allowed`` values (or ``everything`` for
    all of them) as a tuple; anything else is an ``invalid choice`` error naming the choices.

    Example:
        >>> comma_choices(("a", "b"))("b, a"), comma_choices(("a", "b"))("all")
        (('b', 'a'), ('a', 'b'))
    """
    allowed = tuple(allowed)

    def parse(value: str) -> tuple[str, ...]:
        if value.strip() == everything:
            return allowed
        picked = tuple(v.strip() for v in value.split(",") if v.strip())
        bad = [v for v in picked if v not in allowed]
        if bad or not picked:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {value!r} (choose from {everything!r} or a comma list of {', '.join(allowed)})"
            )
        return picked

    parse.__name__ = "comma list"
    return parse
