"""``asymvlm-merge``: merge fine-tuned AsymVLM heads, checkpoints, task vectors or LoRA adapters.

Values come from a YAML recipe (``--config recipe.yaml``, keys = the long flags with underscores),
then command-line flags override them (spelled with underscores or dashes); unknown keys, unknown
flags and abbreviations are an error (one line, exit status 2). Inputs that do not fit
together (keys, shapes, bases, non-finite values, bad density) are a clear error and nothing is
written; outputs are written atomically with a ``merge.json`` report.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Literal

from asymvlm.errors import ConfigError
from asymvlm.merging.api import ON_FLAT, SELECTION_CRITERIA
from asymvlm.merging.methods import METHODS
from asymvlm.registry import dataclass_flags, flag_settings

__all__ = ["main", "build_parser", "MergeArguments"]

EPILOG = """examples:
  asymvlm-merge --base runs/base/model --inputs runs/a/model runs/b/model --method ties --density 0.2 \\
      --output_dir merged
  asymvlm-merge --base runs/base/model --inputs runs/a/model runs/b/model --method task_arithmetic \\
      --lam_grid 0.2,0.4,0.6,0.8,1.0 --val caches/a-val caches/b-val --output_dir merged
  asymvlm-merge --base runs/base/model --inputs runs/a/model runs/b/model --method task_arithmetic \\
      --lam_grid 0.2,0.4,0.6,0.8,1.0 --val caches/a-val caches/b-val --select_by likelihood --output_dir merged
  asymvlm-merge --base base.safetensors --inputs ft1.safetensors ft2.safetensors --method dare_ties --p 0.9 \\
      --output_dir merged
  asymvlm-merge --inputs adapter1 adapter2 --method task_arithmetic --lora_output concat --output_dir merged-adapter
  asymvlm-merge --inputs adapter1 adapter2 --method ties --lora_output svd --rank 8 --output_dir merged-adapter
  asymvlm-merge --inputs adapter1 adapter2 --method knots --inner ties --density 0.2 --lora_output svd --rank 8 \\
      --output_dir merged-adapter
  asymvlm-merge --compute_fisher runs/a/model runs/b/model runs/base/model \\
      --fisher_cache caches/a-train caches/b-train caches/base-train
  asymvlm-merge --base runs/base/model --inputs runs/a/model runs/b/model --method fisher --output_dir merged
  asymvlm-merge --base runs/base/model --inputs runs/a/model runs/b/model --method iso_cts --lines 0.5 \\
      --output_dir merged
  asymvlm-merge --config recipe.yaml --lam 0.7
  asymvlm-merge --list_methods

recipe.yaml:
  base: runs/base/model
  inputs: [runs/a/model, runs/b/model]
  method: ties
  density: 0.2
  lam: 1.0
  output_dir: merged
"""

PROG = "asymvlm-merge"


def _floats(value: str) -> list[float]:
    """``"0.2,0.4"`` -> ``[0.2, 0.4]`` (an argparse ``type``)."""
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers, got {value!r}") from err


@dataclass(frozen=True)
class MergeArguments:
    """The options of ``asymvlm-merge`` that are :func:`~asymvlm.merging.api.merge`'s own (one flag
    each, ``--<field>``; ``metadata`` holds the help and any argparse setting the annotation does not
    say). The merge methods' options are not here: their flags come from :data:`METHODS`."""

    base: str | None = field(
        default=None,
        metadata={
            "help": "What the inputs were fine-tuned from: a saved AsymVLM or a .safetensors checkpoint (or a Hub "
            "id, user/repo[@revision])."
        },
    )
    inputs: list[str] | None = field(
        default=None,
        metadata={"help": "AsymVLMs, checkpoints, task-vector dirs or peft adapters (folders or Hub ids)."},
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Output directory (written atomically, with merge.json and a README.md model card)."},
    )
    method: str = field(
        default="ties", metadata={"help": "Merge method (see --list_methods).", "choices": tuple(METHODS)}
    )
    weights: list[float] | None = field(default=None, metadata={"help": "Per-input weights (default: equal)."})
    lora_output: Literal["dense", "concat", "svd"] = field(
        default="concat",
        metadata={"help": "LoRA inputs: dense (folded into --base), concat (exact), svd (best rank --rank)."},
    )
    rank: int | None = field(
        default=None,
        metadata={
            "help": "LoRA svd output rank (default: the largest input rank; knots/core_space: the sum of the input "
            "ranks, which holds their merge exactly)."
        },
    )
    lam_grid: list[float] | None = field(
        default=None,
        metadata={
            "help": "Comma-separated lambdas to search on --val (AsymVLM inputs; default: no search, --lam).",
            "type": _floats,
        },
    )
    val: list[str] | None = field(
        default=None, metadata={"help": "Validation embedding caches, one per input (mean normalised R@1)."}
    )
    select_by: str | None = field(
        default=None,
        metadata={
            "help": "What --lam_grid selects lambda by on --val: r1 (mean normalised R@1), likelihood (mean log "
            "p(correct image | text): moves with kappa, also when the mean direction is frozen and R@1 cannot), "
            "error_auroc (AUROC of 1/kappa for R@1 misses) (default: r1).",
            "choices": tuple(SELECTION_CRITERIA),
        },
    )
    allow_unrelated: bool | None = field(
        default=None,
        metadata={
            "help": "Merge an expert even when it was not fine-tuned from --base (its lineage says trained from "
            "scratch or from other weights, it records none and is as far from the base as the base's own weights, "
            "or a task vector was computed against another base); by default that is an error. Each such expert is "
            "named in a warning and in merge.json."
        },
    )
    on_flat: str | None = field(
        default=None,
        metadata={
            "help": "When the criterion scores every lambda the same (R@1 of heads with a frozen mean direction): "
            "error, or warn and keep the first lambda (default: error).",
            "choices": ON_FLAT,
        },
    )
    lines: float | None = field(
        default=None,
        metadata={
            "help": "LiNeS after the method: scale the merged task vector by depth, block l of L by alpha + lines * "
            "l / (L - 1), alpha the paper's multi-task rule (Wang et al. 2025; default: off)."
        },
    )
    lines_blocks: int | None = field(
        default=None, metadata={"help": "LiNeS' number of blocks L (default: from the tensors' names, .N.)."}
    )
    compute_fisher: list[str] | None = field(
        default=None,
        metadata={
            "help": "Compute and save (fisher.safetensors) the diagonal Fisher of each saved AsymVLM named here, on "
            "the --fisher_cache of the same position, for --method fisher; then exit."
        },
    )
    fisher_cache: list[str] | None = field(
        default=None, metadata={"help": "Embedding caches, one per --compute_fisher model (its own data)."}
    )
    fisher_estimator: Literal["sampled", "empirical"] = field(
        default="sampled",
        metadata={"help": "sampled (images drawn from the head's own distribution: the true Fisher) or empirical."},
    )
    fisher_pairs: int | None = field(
        default=None, metadata={"help": "At most this many caption pairs per Fisher (default: all)."}
    )


# The merge methods' options that merge() takes as its own keyword (every method declares them).
MERGE_KEYWORDS = ("lam",)


def _method_flag(name: str, param: Any, methods: tuple[str, ...]) -> dict[str, Any]:
    """The flag of a merge-method option: its declared type, choices and help; its default only when
    every method declares it with one default (``lam``), else None: each method's own, in the help."""
    shared = len(methods) == len(METHODS) and len({repr(METHODS[m].param(name).default) for m in methods}) == 1
    if shared:
        return {**flag_settings(param.type), "default": param.default, "help": param.help}
    by = ", ".join(f"{m} {METHODS[m].param(name).default}" for m in methods)
    return {**flag_settings(param.type), "default": None, "help": f"{param.help} (default: the method's own: {by})"}


def _spec() -> dict[str, dict[str, Any]]:
    """YAML key = flag (``--<key>``, also spelled with dashes) -> argparse settings: the fields of
    :class:`MergeArguments`, then every option a merge method declares (:data:`METHODS`)."""
    spec = dataclass_flags(MergeArguments)
    for name, (param, methods) in METHODS.options().items():
        spec[name] = _method_flag(name, param, methods)
    return spec


SPEC: dict[str, dict[str, Any]] = _spec()
# The method options passed to merge() as **options (only the ones given: each method has its own default).
OPTION_KEYS = tuple(k for k in METHODS.options() if k not in MERGE_KEYWORDS)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``asymvlm-merge`` (flags spelled with underscores or dashes; no abbreviations):
    :class:`MergeArguments`' flags, then the merge methods' options from :data:`METHODS`."""
    from asymvlm.cli import make_parser, summary

    p = make_parser(PROG, summary(__doc__), EPILOG)
    p.add_argument("--config", default=None, help="YAML recipe (keys as the flags, with underscores).")
    for key, kw in SPEC.items():
        p.add_argument(f"--{key}", dest=key, **kw)
    p.add_argument("--no_progress", action="store_true", help="No progress bar.")
    p.add_argument("--list_methods", action="store_true", help="List the merge methods with their options and papers.")
    return p


def _check_yaml(parser: argparse.ArgumentParser, doc: dict[str, Any], path: str) -> None:
    """What argparse checks for a flag but not for a default (a YAML value): choices and types."""
    for action in parser._actions:
        value = doc.get(action.dest)
        if value is None and action.dest in doc and action.default is not None:  # null where a value is needed
            raise ConfigError(f"{path}: {action.dest} must be given a value, got null")
        if value is None or isinstance(value, str):  # strings go through the flag's own type
            continue
        key, many = action.dest, action.nargs == "+" or action.type is _floats
        if action.const is True:  # --sign_weighted
            ok, want = isinstance(value, bool), "true or false"
        elif isinstance(value, list) and not many:
            ok, want = False, "a single value"
        else:
            items = value if isinstance(value, list) else [value]
            kind = {float: (int, float), _floats: (int, float), int: (int,)}.get(action.type, (str,))
            ok = all(isinstance(v, kind) and not isinstance(v, bool) for v in items)
            want = {(int, float): "a number", (int,): "an integer"}.get(kind, "a string")
            want += " (or a list of them)" if many else ""
        if not ok:
            raise ConfigError(f"{path}: {key} must be {want}, got {value!r}")
    for action in parser._actions:  # argparse checks the choices of flags, not of defaults
        value = doc.get(action.dest)
        if action.choices is not None and value is not None and value not in action.choices:
            raise ConfigError(f"{path}: {action.dest}={value!r} is not one of {list(action.choices)}")


def _config(argv: list[str]) -> dict[str, Any]:
    """YAML recipe values first (``--config``), then the flags; every value checked by the parser."""
    from asymvlm.cli import ArgumentParser
    from asymvlm.config import load_yaml

    pre = ArgumentParser(prog=PROG, add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    if known.config:  # ConfigError names unknown keys
        doc = load_yaml(known.config, prog=PROG, known=SPEC)
        _check_yaml(parser, doc, known.config)
        parser.set_defaults(**doc)  # string values are converted by each flag's type
    args = parser.parse_args(argv)
    cfg: dict[str, Any] = {k: v for k, v in vars(args).items() if k in SPEC and v is not None}
    cfg["_progress"] = not args.no_progress
    cfg["_list"] = args.list_methods
    for key in ("inputs", "val", "weights"):  # nargs="+": a single YAML value is a list of one
        if key in cfg and not isinstance(cfg[key], list):
            cfg[key] = [cfg[key]]
    return cfg


def main(argv: list[str] | None = None) -> int:
    """``asymvlm-merge``; returns the exit status (2 for a user error, printed as one line)."""
    from asymvlm.cli import run

    return run(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    cfg = _config(argv)
    if cfg["_list"]:
        print(METHODS.describe())
        return 0
    if cfg.get("compute_fisher"):
        return _compute_fishers(cfg)
    missing = [k for k in ("inputs", "output_dir") if not cfg.get(k)]
    if missing:
        raise ConfigError(f"missing {', '.join('--' + m for m in missing)} (a flag or a --config key)")
    import sys
    import warnings

    from asymvlm.merging.api import FlatCriterionWarning, merge

    method = cfg["method"]
    options = {k: cfg[k] for k in (*OPTION_KEYS, "lines", "lines_blocks") if k in cfg}
    select_by = cfg.get("select_by")
    logged: list[float] = []

    def log(entry: dict[str, Any]) -> None:
        if not logged:
            print(f"{PROG}: selecting lambda by {select_by or 'r1'} on {len(cfg['val'])} validation cache(s)")
        logged.append(entry["lam"])
        extra = ""
        if "normalised_R@1" in entry:
            extra = " normalised R@1 " + ", ".join(f"{x:.3f}" for x in entry["normalised_R@1"])
        elif (select_by or "r1") != "r1" and "mean_R@1" in entry:
            extra = f" mean R@1 {entry['mean_R@1']:.3f}"
        print(f"  lam={entry['lam']:<6g} score={entry['score']:.4f}{extra}")

    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FlatCriterionWarning)
            report = merge(
                cfg.get("base"),
                cfg["inputs"],
                cfg["output_dir"],
                method,
                lam=float(cfg["lam"]),
                weights=cfg.get("weights"),
                lora_output=cfg["lora_output"],
                rank=cfg.get("rank"),
                lam_grid=cfg.get("lam_grid"),
                val=cfg.get("val"),
                select_by=select_by,
                on_flat=cfg.get("on_flat"),
                progress=cfg["_progress"],
                log=log,
                allow_unrelated=bool(cfg.get("allow_unrelated")),
                **options,
            )
    finally:
        for w in caught:  # the flat-criterion warning as one line; anything else as Python shows it
            if issubclass(w.category, FlatCriterionWarning):
                print(f"{PROG}: warning: {' '.join(str(w.message).split())}", file=sys.stderr)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    opts = ", ".join(f"{k}={v}" for k, v in options.items())
    what = f"{len(report['inputs'])} {report['kind']} input(s)"
    onto = f" onto {report['base']}" if report.get("base") else ""
    size = f"; {report['keys']} tensors, {report['parameters']:,} parameters" if "keys" in report else ""
    print(f"{PROG}: merged {what}{onto} with {method}({opts}) lam={report.get('lam', cfg['lam'])}{size}")
    if "lambda_search" in report:
        search = report["lambda_search"]
        flat = ", flat: every lambda scored the same" if search["flat"] else ""
        print(f"  best lam {search['best_lam']} (score {search['best_score']:.4f} by {search['criterion']}{flat})")
    if "truncation_error" in report:
        te = report["truncation_error"]
        print(f"  rank-{report['rank']} SVD truncation error: overall {te['overall']:.3e}, worst layer {te['max']:.3e}")
    elif report.get("output") == "concat":
        print(f"  exact concatenated LoRA of rank {report['rank']}")
    print(f"  -> {cfg['output_dir']}")
    return 0


def _compute_fishers(cfg: dict[str, Any]) -> int:
    """``--compute_fisher``: each model's Fisher on its cache, saved next to it."""
    from asymvlm.merging.fisher import compute_fisher

    models, caches = cfg["compute_fisher"], cfg.get("fisher_cache") or []
    if len(caches) != len(models):
        raise ConfigError(f"--compute_fisher names {len(models)} model(s) but --fisher_cache {len(caches)}: one each")
    for m, c in zip(models, caches):
        est = cfg["fisher_estimator"]
        path = compute_fisher(m, c, estimator=est, max_pairs=cfg.get("fisher_pairs"), progress=cfg["_progress"])
        print(f"{PROG}: Fisher ({est}) of {m} on {c} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
