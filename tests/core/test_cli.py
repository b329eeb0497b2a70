"""The five console scripts speak one dialect (``asymvlm.cli``): ``--help`` with defaults, choices and
examples that parse; every user error one line ``<prog>: error: ...`` and status 2; both spellings
of every multi-word flag, no abbreviations; ``--output_dir`` wherever a script writes."""

import importlib
import logging
import re
import shlex

import pytest

from asymvlm import cli

# script -> (module, a multi-word flag, an invalid value of it)
SCRIPTS = {
    "asymvlm-train": ("asymvlm.training.cli", "max_steps", "abc"),
    "asymvlm-federate": ("asymvlm.training.federate", "num_clients", "abc"),
    "asymvlm-merge": ("asymvlm.merging.cli", "lam_grid", "x,y"),
    "asymvlm-eval": ("asymvlm.eval.cli", "caption_styles", "poetry"),
    "asymvlm-demo": ("asymvlm.training.demo", "train_images", "abc"),
}

# what --help must show: a choices set and a default of the script
HELP_SHOWS = {
    "asymvlm-train": ("{adamw,sgd}", "(default: 20000)"),
    "asymvlm-federate": ("{iid,", "(default: fedavg)"),
    "asymvlm-merge": ("{global,per_tensor}", "(default: ties)"),
    "asymvlm-eval": ("{plain,photo,synonyms,reordered}", "(default: eval-out)"),
    "asymvlm-demo": ("{2,3}", "(default: demo-out)"),
}


def module(prog):
    return importlib.import_module(SCRIPTS[prog][0])


def options(prog) -> set[str]:
    return set(module(prog).build_parser()._option_string_actions)


def one_error_line(capsys, prog) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, synthetic_cache):
    return synthetic_cache(tmp_path_factory.mktemp("clicache") / "c", 32, dim=8, captions=True)


# ------------------------------------------------------------------------------------------------
# --help, the flags, the examples
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prog", SCRIPTS)
def test_help_shows_defaults_choices_and_examples(prog, capsys):
    assert module(prog).main(["--help"]) == 0
    out = capsys.readouterr().out
    choices, default = HELP_SHOWS[prog]
    assert out.startswith(f"usage: {prog}") and "examples:" in out
    assert choices in out and default in out, out
    # a default is shown once per option, never as "None" (such options say what they fall back to)
    assert "(default: None)" not in out
    for block in re.split(r"\n  (?=-)", out):
        assert block.count("(default:") <= 1, block


@pytest.mark.parametrize("prog", SCRIPTS)
def test_output_dir_everywhere_and_no_old_names(prog):
    flags = options(prog)
    assert {"--output_dir", "--output-dir"} <= flags
    assert not flags & {"--out", "--fed_output_dir", "--fed_resume"}
    if prog in ("asymvlm-train", "asymvlm-federate"):
        assert {"--resume", "--config"} <= flags


@pytest.mark.parametrize("prog", SCRIPTS)
def test_every_multi_word_flag_has_both_spellings(prog):
    flags = {f for f in options(prog) if f.startswith("--")}
    for flag in flags:
        assert "--" + flag[2:].replace("-", "_") in flags and "--" + flag[2:].replace("_", "-") in flags, flag


def test_both_spellings_parse_to_the_same_value():
    from asymvlm.eval.cli import build_parser as eval_parser
    from asymvlm.merging.cli import build_parser as merge_parser
    from asymvlm.training.config import parse_config
    from asymvlm.training.demo import build_parser as demo_parser

    for under, dash in (("--lam_grid", "--lam-grid"), ("--output_dir", "--output-dir")):
        a = merge_parser().parse_args([under, "0.5,1"]).__dict__
        assert a == merge_parser().parse_args([dash, "0.5,1"]).__dict__
    assert merge_parser().parse_args(["--lam-grid", "0.5,1"]).lam_grid == [0.5, 1.0]
    assert eval_parser().parse_args(["--caption-styles", "photo,plain"]).caption_styles == ("photo", "plain")
    assert eval_parser().parse_args(["--output-dir", "x"]).output_dir == "x"
    assert demo_parser().parse_args(["--output-dir", "d", "--train-images", "5"]).train_images == 5
    assert parse_config(["--max-steps", "3", "--output-dir", "o"]).train.output_dir == "o"


def test_flags_of_one_word_values_both_ways_through_main(capsys):
    """main() itself recognises both spellings: an invalid value is a type error, not an unknown flag."""
    for prog, (_, flag, bad) in SCRIPTS.items():
        messages = []
        for spelled in (f"--{flag}", "--" + flag.replace("_", "-")):
            assert module(prog).main([spelled, bad]) == 2
            messages.append(one_error_line(capsys, prog))
        for message in messages:
            assert "unknown argument" not in message and "unrecognized" not in message, message
            assert "invalid" in message or "must be" in message, message


def _examples(epilog: str, prog: str) -> list[list[str]]:
    """The example commands of an epilog (continuation lines joined), as the arguments after ``prog``."""
    out = []
    for line in epilog.replace("\\\n", " ").splitlines():
        if not line.strip().startswith((prog, "accelerate launch")):
            continue  # prose
        tokens = shlex.split(line, comments=True)
        assert prog in tokens, line
        out.append(tokens[tokens.index(prog) + 1 :])
    return out


@pytest.mark.parametrize("prog", SCRIPTS)
def test_epilog_examples_name_real_flags_and_parse(prog, tmp_path, monkeypatch):
    mod = module(prog)
    examples = _examples(mod.EPILOG, prog)
    assert len(examples) >= 3, mod.EPILOG
    flags = options(prog)
    for argv in examples:
        unknown = [t for t in argv if t.startswith("--") and t not in flags]
        assert not unknown, f"{prog} {' '.join(argv)}: {unknown} are not flags of {prog}"
    # and their values parse (config files the examples name, written empty)
    monkeypatch.chdir(tmp_path)
    for name in ("exp.yaml", "fed.yaml", "recipe.yaml"):
        (tmp_path / name).write_text("{}\n")
    for argv in examples:
        if prog == "asymvlm-train":
            from asymvlm.training.config import parse_config

            parse_config(argv)
        elif prog == "asymvlm-federate":
            if {
                "--list_recipes",
                "--list-recipes",
                "--list_personalizers",
                "--list-personalizers",
                "--list_scale",
                "--list-scale",
            } & set(argv):
                assert mod.main(argv) == 0  # a listing, not a run
                continue
            from asymvlm.cli import parse_dataclass_args

            parse_dataclass_args(mod._groups(), argv, prog)
        else:
            mod.build_parser().parse_args(argv)
    if prog == "asymvlm-merge":  # the recipe.yaml of the epilog: every key is a flag
        recipe = mod.EPILOG.split("recipe.yaml:", 1)[1]
        keys = re.findall(r"^\s+([a-z_]+):", recipe, flags=re.M)
        assert keys and set(keys) <= set(mod.SPEC), keys


def test_train_epilog_uses_the_tested_multi_process_command():
    from asymvlm.training.cli import EPILOG

    assert "--cpu" not in EPILOG
    assert "accelerate launch --multi_gpu --num_processes 2 --no_python asymvlm-train" in EPILOG


def test_eval_epilog_models_are_what_training_writes():
    from asymvlm.eval.cli import EPILOG

    models = re.findall(r"--model (\S+)", EPILOG)
    assert models and all(m.endswith("/model") for m in models), models


def test_registry_listings(capsys):
    from asymvlm.federated.recipes import RECIPES
    from asymvlm.merging.cli import main as merge
    from asymvlm.merging.methods import METHODS
    from asymvlm.training.federate import main as federate

    for spelled in ("--list-recipes", "--list_recipes"):
        assert federate([spelled]) == 0
        out = capsys.readouterr().out
        for name, entry in RECIPES.items():
            assert f"{name}:" in out and all(p.name in out for p in entry.params), name
    for spelled in ("--list-methods", "--list_methods"):
        assert merge([spelled]) == 0
        out = capsys.readouterr().out
        for name, entry in METHODS.items():
            assert f"{name}:" in out and all(p.name in out for p in entry.params), name


# ------------------------------------------------------------------------------------------------
# user errors: one line, status 2
# ------------------------------------------------------------------------------------------------
def error_cases(tmp_path):
    missing = str(tmp_path / "missing")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    quiet = ["--progress", "false", "--output_dir", str(tmp_path / "o")]
    return {
        "asymvlm-train": {
            "unknown flag": ["--nonsense", "1"],
            "abbreviation": ["--max_step", "3"],
            "bad choice": ["--optimizer", "rmsprop"],
            "missing input": ["--cache_dir", missing, "--log_with", "none", *quiet],
            "missing config": ["--config", missing + ".yaml"],
            "wrong type": ["--max_steps", "abc"],
            "bad value": ["--lr", "-1"],
        },
        "asymvlm-federate": {
            "unknown flag": ["--clients", "4"],
            "abbreviation": ["--num_client", "4"],
            "bad choice": ["--recipe", "fedsgd"],
            "missing input": ["--cache_dir", missing, *quiet],
            "missing config": ["--config", missing + ".yaml"],
            "wrong type": ["--rounds", "abc"],
            "old name": ["--fed_output_dir", "x"],
        },
        "asymvlm-merge": {
            "unknown flag": ["--nonsense"],
            "abbreviation": ["--dens", "0.2"],
            "bad choice": ["--scope", "nowhere"],
            "bad method": ["--method", "nope"],
            "missing input": ["--inputs", missing, "--output_dir", str(tmp_path / "m")],
            "missing config": ["--config", missing + ".yaml"],
            "wrong type": ["--density", "abc"],
            "old name": ["--out", str(tmp_path / "m"), "--inputs", missing],
            "required": ["--inputs", missing],
        },
        "asymvlm-eval": {
            "unknown flag": ["--nonsense"],
            "abbreviation": ["--imag", "5"],
            "bad choice": ["--caption_styles", "poetry"],
            "missing input": ["--model", missing],
            "wrong type": ["--images", "abc"],
            "bad device": ["--device", "gpu0"],
            "old name": ["--out", "x"],
        },
        "asymvlm-demo": {
            "unknown flag": ["--nonsense"],
            "abbreviation": ["--qui"],
            "bad choice": ["--world", "4"],
            "output is a file": ["--quick", "--output_dir", str(a_file)],
            "wrong type": ["--steps", "abc"],
            "old name": ["--out", "x"],
        },
    }


@pytest.mark.parametrize("prog", SCRIPTS)
def test_user_errors_are_one_line_and_status_2(prog, tmp_path, capsys):
    main = module(prog).main
    for case, argv in error_cases(tmp_path)[prog].items():
        code = main(argv)
        line = one_error_line(capsys, prog)
        assert code == 2, (case, line)
        if case in ("abbreviation", "unknown flag", "old name"):
            assert argv[0] in line, (case, line)
        if case == "missing input":
            assert "missing" in line, line
    assert not (tmp_path / "m").exists()  # a failed merge writes nothing


def test_merge_checks_yaml_values_like_flags(tmp_path, capsys):
    from asymvlm.merging.cli import main as merge

    y = tmp_path / "r.yaml"
    for text, message in (
        ("inputs: [a]\noutput_dir: m\nscope: nowhere\n", "scope='nowhere' is not one of"),
        ("inputs: [a]\noutput_dir: m\nlam: [1]\n", "lam must be a single value"),
        ("inputs: [a]\noutput_dir: m\ndensity: abc\n", "invalid float value: 'abc'"),
        ("inputs: [a]\noutput_dir: m\nrank: 1.5\n", "rank must be an integer"),
        ("inputs: [a]\nout: m\n", "unknown config key(s) ['out']"),
        ("inputs: [a]\noutput_dir: m\nmethod: null\n", "method must be given a value, got null"),
        ("inputs: [a]\noutput_dir: m\nlam: null\n", "lam must be given a value, got null"),
        ("inputs: [a]\noutput_dir: m\nlora_output: null\n", "lora_output must be given a value, got null"),
    ):
        y.write_text(text)
        assert merge(["--config", str(y)]) == 2
        assert message in one_error_line(capsys, "asymvlm-merge")


# ------------------------------------------------------------------------------------------------
# the helper itself
# ------------------------------------------------------------------------------------------------
def test_run_turns_user_errors_into_one_line(capsys):
    from asymvlm.errors import ArtefactError, ConfigError, TrainingDiverged

    def raising(exc):
        def body(argv):
            raise exc

        return body

    for exc in (
        ArtefactError("a corrupt\n  file\tthere"),
        FileNotFoundError(2, "No such file or directory", "x.json"),
        PermissionError(13, "Permission denied", "/root/x"),
        IsADirectoryError(21, "Is a directory", "d"),
        NotADirectoryError(20, "Not a directory", "f/x"),
        ConfigError("lr must be positive"),
        TrainingDiverged("loss is nan at step 3"),
    ):
        assert cli.run("prog", raising(exc), []) == 2
        line = one_error_line(capsys, "prog")
        assert "\t" not in line and "  " not in line, line
    assert cli.run("prog", raising(ArtefactError("a corrupt\n  file")), []) == 2
    assert capsys.readouterr().err == "prog: error: a corrupt file\n"
    assert cli.run("prog", raising(KeyboardInterrupt()), []) == 130
    assert capsys.readouterr().err == "prog: interrupted\n"
    with pytest.raises(TypeError):  # a bug keeps its traceback
        cli.run("prog", raising(TypeError("bug")), [])
    with pytest.raises(ValueError):  # a plain ValueError is a bug too (issue 27)
        cli.run("prog", raising(ValueError("internal")), [])
    assert cli.run("prog", lambda argv: None, []) == 0
    assert cli.run("prog", lambda argv: 3, []) == 3


def test_parser_factory_dialect(capsys):
    from asymvlm.errors import ConfigError

    p = cli.make_parser("prog", epilog="examples:\n  prog --lam_grid 1,2\n")
    p.add_argument("--lam_grid", default="1", help="lambdas")
    p.add_argument("--mode", choices=("a", "b"), default="a", help="a mode")
    assert p.parse_args(["--lam-grid", "3"]).lam_grid == "3"
    with pytest.raises(ConfigError, match="unrecognized arguments: --lam 3"):
        p.parse_args(["--lam", "3"])
    with pytest.raises(ConfigError, match="invalid choice: 'c'"):
        p.parse_args(["--mode", "c"])
    text = p.format_help()
    assert "{a,b}" in text and "(default: a)" in text and "  prog --lam_grid 1,2\n" in text


@pytest.fixture
def asymvlm_logger():
    logger = logging.getLogger("asymvlm")
    saved = logger.level, list(logger.handlers)
    yield logger
    logger.handlers[:] = saved[1]
    logger.setLevel(saved[0])


def test_logging_goes_to_stderr_with_the_prog_and_only_rank_0_reports(monkeypatch, capsys, asymvlm_logger):
    log = logging.getLogger("asymvlm.some.module")
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    cli.setup_logging("prog")
    cli.setup_logging("prog")  # twice: one handler
    log.info("hello %d", 1)
    assert capsys.readouterr().err == "prog: hello 1\n"
    monkeypatch.setenv("RANK", "1")
    assert not cli.is_main_process()
    cli.setup_logging("prog")
    log.info("quiet")
    log.warning("loud")
    assert capsys.readouterr().err == "prog: loud\n"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not cli.is_main_process()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert cli.is_main_process()
    n = len(asymvlm_logger.handlers)
    assert cli.run("other", lambda argv: log.info("inside") or 0, []) == 0
    assert capsys.readouterr().err == "other: inside\n"
    assert len(asymvlm_logger.handlers) == n  # run() leaves logging as it found it


def test_train_logs_through_logging_and_prints_its_result(cache_dir, tmp_path, capsys):
    from asymvlm.training.cli import main

    argv = ["--cache_dir", str(cache_dir), "--hidden_dims", "8", "--max_steps", "2", "--batch_size", "16",
            "--save_every", "0", "--eval_every", "-1", "--progress", "false", "--log_with", "none",
            "--output_dir", str(tmp_path / "run"), "--resume"]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert f"asymvlm-train: saved {tmp_path / 'run' / 'model'}" in out
    assert f"asymvlm-train: no checkpoint in {tmp_path / 'run' / 'checkpoints'}; starting from scratch" in err
    assert "starting from scratch" not in out
