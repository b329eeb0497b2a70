"""A run's output folder and its resume: what ``asymvlm-train`` and ``asymvlm-federate`` check
before any work and what ``--overwrite`` / ``--resume`` may touch.

* :func:`check_output_dir` refuses, before any work, a folder a run cannot use;
* :func:`claim_output_dir` takes a new run's folder (new or empty; or, with ``--overwrite``,
  :func:`clear_run_outputs` removes what an earlier run wrote there and nothing else, with
  :func:`model_entries` telling asymvlm's files in a saved model folder from a user's);
* :func:`check_resume_config` checks that a resumed run is the same run as its checkpoint's.

Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     out = Path(tmp) / "run"
    ...     check_output_dir(out)  # a new folder under a writable one: usable
    ...     claim_output_dir(out, ("model",), overwrite=False)
    ...     check_resume_config({"lr": 0.1}, {"lr": 0.1, "resume": True}, ("resume",), out)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from asymvlm.errors import ArtefactError, ConfigError

__all__ = ["check_output_dir", "claim_output_dir", "clear_run_outputs", "model_entries", "check_resume_config"]


def check_output_dir(out: str | Path) -> None:
    """Refuse, before any work, an output folder a run cannot use: a file there, or a folder it
    cannot create or write into (a :class:`ConfigError` naming it). Whether a used folder may be
    reused is :func:`claim_output_dir`'s question."""
    import os

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file, not a folder: choose another output_dir")
    probe = out
    while not probe.exists():  # the nearest existing folder is where the run's folders get created
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"output_dir {out}: {probe} is a file, not a folder: choose another output_dir")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"output_dir {out}: {probe} is not writable: choose another output_dir or fix its permissions"
        )


def claim_output_dir(
    out: Path,
    outputs: tuple[str, ...],
    *,
    overwrite: bool,
    ours: Callable[[Path], bool] | None = None,
) -> None:
    """A new run's output folder: new or empty; or (``overwrite``) cleared by :func:`clear_run_outputs`
    of what an earlier run wrote there, and nothing else. A non-empty folder without ``overwrite`` is a
    :class:`ConfigError`."""
    out = Path(out)
    if overwrite:
        clear_run_outputs(out, outputs, ours=ours)
    elif out.is_dir() and any(out.iterdir()):
        raise ConfigError(
            f"output_dir {out} is not empty (a previous run?): pass --resume to continue that run, --overwrite to "
            "replace it, or choose a new output_dir"
        )


def model_entries(model_dir: Path) -> tuple[set[str], bool]:
    """The entries of a saved model folder asymvlm wrote, and whether a record says so: its
    ``.asymvlm-files.json`` (:func:`asymvlm.io.atomic_directory`), or, for a folder saved without one,
    the names :meth:`asymvlm.model.AsymVLM.save_pretrained` writes (its README only when it is an
    asymvlm card). Anything else there is the user's."""
    from asymvlm.confidence import CONFIDENCE_NAME
    from asymvlm.hub import CARD_NAME, is_asymvlm_card
    from asymvlm.io import owned_entries
    from asymvlm.model import ADAPTER_DIR, BASE_DELTA_NAME, CONFIG_NAME, WEIGHTS_NAME

    owned = owned_entries(model_dir)
    if owned is not None:
        return owned, True
    legacy = {CONFIG_NAME, WEIGHTS_NAME, ADAPTER_DIR, BASE_DELTA_NAME, CONFIDENCE_NAME}
    card = model_dir / CARD_NAME
    if card.is_file() and is_asymvlm_card(card):
        legacy.add(CARD_NAME)
    return legacy, False


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def clear_run_outputs(out: Path, outputs: tuple[str, ...], *, ours: Callable[[Path], bool] | None = None) -> None:
    """``--overwrite``: remove what an earlier run wrote into ``out`` and nothing else.

    Of each name in ``outputs``: a file goes (a run's log); a ``model`` folder loses the entries
    :func:`model_entries` says asymvlm wrote; any other folder loses the entries ``ours(path)``
    accepts (a run's checkpoint folders, a tracker's event files) and, inside sub-folders that carry
    an asymvlm record, the recorded entries; everything else stays (a user's notes, also inside
    ``model/`` and ``checkpoints/``) and a warning names it. A ``model/`` folder without a record that
    holds anything but a model's files is a :class:`ConfigError` and nothing is removed: asymvlm
    cannot tell what is the user's. Empty folders left behind go.
    """
    import logging

    from asymvlm.io import MANIFEST_NAME, owned_entries

    out = Path(out)
    ours = ours or (lambda p: False)
    plan: list[Path] = []
    kept: list[str] = []
    folders: list[Path] = []

    def walk(folder: Path) -> None:
        record = owned_entries(folder)
        for p in sorted(folder.iterdir()):
            if ours(p) or (record is not None and p.name in record and p.name != MANIFEST_NAME):
                plan.append(p)
            elif p.is_dir() and not p.is_symlink():
                folders.append(p)
                walk(p)
            elif p.name == MANIFEST_NAME and record is not None:
                plan.append(p)  # re-checked below: it stays while a user's file does
            else:
                kept.append(str(p.relative_to(out)))

    for name in outputs:
        target = out / name
        if name == "model" and (target.is_dir() and not target.is_symlink()):
            owned, recorded = model_entries(target)
            present = sorted(p.name for p in target.iterdir())
            theirs = [n for n in present if n not in owned]
            if not recorded and theirs:
                raise ConfigError(
                    f"--overwrite: {target} holds {theirs[:4]}, which asymvlm did not write, and no record "
                    f"({MANIFEST_NAME}) of what it wrote there: nothing was removed; move those files out of it, "
                    "or choose a new output_dir"
                )
            plan += [target / n for n in present if n in owned and n != MANIFEST_NAME]
            kept += [f"{name}/{n}" for n in theirs]
            folders.append(target)
        elif name == "model" and (target.exists() or target.is_symlink()):
            raise ConfigError(f"--overwrite: {target} is not a folder asymvlm wrote: nothing was removed")
        elif target.is_dir() and not target.is_symlink():
            folders.append(target)
            walk(target)
        elif target.exists() or target.is_symlink():
            plan.append(target)
    keep_records = {Path(out / k).parent for k in kept}
    for p in plan:
        if p.name == MANIFEST_NAME and p.parent in keep_records:
            continue  # the record stays while the user's files do: a new save replaces the folder around them
        _remove(p)
    for folder in sorted(folders, key=lambda d: -len(d.parts)):  # empty folders go (sub-folders first)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    if kept:
        logging.getLogger(__name__).warning(
            "--overwrite kept %d file(s) in %s that asymvlm did not write: %s%s",
            len(kept), out, ", ".join(kept[:6]), " ..." if len(kept) > 6 else "",
        )  # fmt: skip


def _json_kind(value: Any) -> str:
    """The JSON type of ``value`` as a config file holds it (int and float are one kind: a number)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    return "object" if isinstance(value, dict) else type(value).__name__


def _kind_mismatch(saved: Any, now: Any) -> str | None:
    """Why ``saved`` cannot be a value of the config key whose value in this run is ``now`` (another
    JSON type; null is a value a key may change to or from), or None."""
    a, b = _json_kind(saved), _json_kind(now)
    if "null" in (a, b):
        return None
    if a != b:
        return f"is a {a}, this run's is a {b}"
    if a == "list" and now:
        want = {_json_kind(x) for x in now}
        bad = [_json_kind(x) for x in saved if _json_kind(x) not in want]
        if bad:
            return f"holds a {bad[0]}, this run's holds {', '.join(sorted(want))} values"
    return None


def check_resume_config(
    saved: dict[str, Any],
    now: dict[str, Any],
    may_change: tuple[str, ...],
    where: Path,
    *,
    source: str | Path | None = None,
) -> None:
    """A resumed run is the same run: every key outside ``may_change`` must equal the saved one.

    ``source`` is the file the saved config was read from (default: ``where``); every message names
    it. A saved config that is not an object, lacks a key, has a key this version does not know, or
    holds a value of another JSON type is an :class:`ArtefactError` (the file was altered or written
    by another version); a key whose value differs is a :class:`ConfigError` naming the keys
    (old -> new) and asking for the same config.

    Example:
        >>> check_resume_config({"lr": 0.1, "seed": 0}, {"lr": 0.1, "seed": 0}, (), Path("run"))
        >>> check_resume_config({"lr": 0.1}, {"lr": 0.1, "seed": 0}, (), Path("run"), source="run/state.json")
        Traceback (most recent call last):
        ...
        asymvlm.errors.ArtefactError: run/state.json: config lacks the key 'seed'...
        >>> check_resume_config({"lr": 0.1}, {"lr": 0.2}, (), Path("run"), source="run/state.json")
        Traceback (most recent call last):
        ...
        asymvlm.errors.ConfigError: cannot resume run: run/state.json records another config; differing keys: lr...
    """
    source = source if source is not None else where
    altered = "the file was altered, or written by another asymvlm version: resume with that version, or start again"
    if not isinstance(saved, dict):
        raise ArtefactError(f"{source}: config is a {_json_kind(saved)}, not an object; {altered}")
    missing = sorted(k for k in now if k not in saved and k not in may_change)
    if missing:
        raise ArtefactError(f"{source}: config lacks the key {missing[0]!r}"
                            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; {altered}")  # fmt: skip
    unknown = sorted((str(k) for k in saved if k not in now and k not in may_change), key=str)
    if unknown:
        raise ArtefactError(f"{source}: config.{unknown[0][:60]!r} is not a config key of this run; {altered}")
    for k in sorted(now):
        why = None if k in may_change or k not in saved else _kind_mismatch(saved[k], now[k])
        if why:
            raise ArtefactError(f"{source}: config.{k} {why}; {altered}")
    differ = sorted(k for k in set(saved) | set(now) if k not in may_change and saved.get(k) != now.get(k))
    if differ:
        shown = ", ".join(f"{k} ({_short(saved.get(k))} -> {_short(now.get(k))})" for k in differ[:6])
        raise ConfigError(
            f"cannot resume {where}: {source} records another config; differing keys: {shown}. Use the same config "
            f"(only {', '.join(may_change)} may change), or a new output_dir"
        )


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
