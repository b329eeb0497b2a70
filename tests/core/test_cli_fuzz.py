"""Every console script, fed random and malformed flags and YAML configs (hypothesis), exits
cleanly: status 2 with exactly one `<prog>: error:` line, never a traceback, and nothing written."""

import io
import math
import os
import string
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asymvlm.eval.cli import main as eval_main
from asymvlm.merging.cli import main as merge_main
from asymvlm.training.cli import main as train_main
from asymvlm.training.demo import main as demo_main
from asymvlm.training.federate import main as federate_main

MISSING = "/nonexistent/asymvlm-fuzz"

# known option names of each command (the fuzzer mixes them with unknown ones)
TRAIN_KEYS = [
    "family",
    "hidden_dims",
    "max_steps",
    "batch_size",
    "lr",
    "optimizer",
    "trainable",
    "lora_r",
    "seed",
    "weight_decay",
    "scheduler",
    "warmup_steps",
    "positive_mode",
    "vmf_normalizer",
    "eval_fraction",
    "train_images",
    "keep_last",
    "resume",
    "overwrite",
    "mixed_precision",
    "init_from",
    "mask_file",
]
FED_KEYS = [
    "recipe",
    "rounds",
    "num_clients",
    "clients_per_round",
    "client_fraction",
    "min_clients",
    "partition",
    "partition_alpha",
    "local_steps",
    "local_lr",
    "local_batch_size",
    "trainable",
    "lora_mode",
    "attack",
    "malicious_fraction",
    "dp_noise_multiplier",
    "dp_max_norm",
    "keep_last",
    "server_lr",
    "server_beta1",
    "server_tau",
    "qffl_q",
    "krum_num_malicious",
    "trim_beta",
    "hidden_dims",
    "resume",
]
MERGE_KEYS = [
    "method",
    "lam",
    "weights",
    "density",
    "scope",
    "sign",
    "p",
    "seed",
    "lora_output",
    "rank",
    "lam_grid",
    "normalize",
    "zero_sign",
]
EVAL_KEYS = ["images", "device", "name", "batch_size", "caption_styles", "visual_styles", "seed"]
DEMO_KEYS = ["train_images", "eval_images", "steps", "rounds", "clients", "seed"]

scalar = st.one_of(
    st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(string.ascii_letters + string.digits + "-_.,[]: ", max_size=12),
    st.booleans(),
    st.none(),
    st.lists(st.integers(-3, 3), max_size=3),
)


def as_flag_value(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return str(v)


def config_strategy(keys):
    # random names, except --help and the prefixes argparse expands to it (those print help and exit 0)
    random_names = st.text(string.ascii_lowercase + "_", min_size=1, max_size=10).filter(
        lambda k: not "help".startswith(k)
    )
    names = st.one_of(st.sampled_from(keys), random_names)
    return st.dictionaries(names, scalar, max_size=5)


def run_cli(main, argv, cwd: Path):
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(argv)
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()


def check(main, prog, argv, tmp_path_factory, expect: str = ""):
    cwd = tmp_path_factory.mktemp("fuzz")
    code, out, err = run_cli(main, argv, cwd)
    assert "Traceback" not in out + err, (argv, err)
    assert code == 2, (argv, code, err[-500:])
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], (argv, err)
    assert expect in errors[0], (expect, errors[0])
    assert not any(cwd.iterdir()), (argv, sorted(p.name for p in cwd.rglob("*")))  # nothing written


def argv_from(config: dict, tmp_path_factory, as_yaml: bool) -> list[str]:
    if as_yaml:
        path = tmp_path_factory.mktemp("cfg") / "c.yaml"
        path.write_text(yaml.safe_dump(config))
        return ["--config", str(path)]
    argv = []
    for k, v in config.items():
        argv += [f"--{k}", as_flag_value(v)]
    return argv


FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(config=config_strategy(TRAIN_KEYS), as_yaml=st.booleans())
def test_fuzz_asymvlm_train(config, as_yaml, tmp_path_factory):
    # the data never exist: a config that parses fails at the cache, before anything is written
    argv = argv_from(config, tmp_path_factory, as_yaml) + ["--cache_dir", MISSING, "--dataset", "shapeworld"]
    check(train_main, "asymvlm-train", argv, tmp_path_factory)


@FUZZ
@given(config=config_strategy(FED_KEYS), as_yaml=st.booleans())
def test_fuzz_asymvlm_federate(config, as_yaml, tmp_path_factory):
    argv = argv_from(config, tmp_path_factory, as_yaml) + ["--cache_dir", MISSING]
    check(federate_main, "asymvlm-federate", argv, tmp_path_factory)


@FUZZ
@given(config=config_strategy(MERGE_KEYS), as_yaml=st.booleans())
def test_fuzz_asymvlm_merge(config, as_yaml, tmp_path_factory):
    argv = argv_from(config, tmp_path_factory, as_yaml) + ["--inputs", MISSING, "--output_dir", "merged"]
    check(merge_main, "asymvlm-merge", argv, tmp_path_factory)


@FUZZ
@given(config=config_strategy(EVAL_KEYS))
def test_fuzz_asymvlm_eval(config, tmp_path_factory):
    argv = argv_from(config, tmp_path_factory, False) + ["--model", MISSING, "--output_dir", "ev"]
    check(eval_main, "asymvlm-eval", argv, tmp_path_factory)


bad_number = st.one_of(st.integers(-(10**6), 0), st.sampled_from(["x", "1.5", "nan", "", "--", "1e999"]))


@FUZZ
@given(
    key=st.sampled_from(DEMO_KEYS), value=bad_number, extra=st.lists(st.sampled_from(["--nope", "--dens"]), max_size=1)
)
def test_fuzz_asymvlm_demo_bad_values(key, value, extra, tmp_path_factory):
    if key == "seed" and isinstance(value, int) and value == 0:
        value = -1  # 0 is a valid seed: this test feeds bad values only
    if key == "clients" and isinstance(value, int) and value >= 2:
        value = 1
    check(demo_main, "asymvlm-demo", [f"--{key}", str(value), *extra, "--output_dir", "demo"], tmp_path_factory)


@pytest.mark.parametrize(
    "main,prog,argv,expect",
    [
        (train_main, "asymvlm-train", ["--max_step", "3"], "--max_step"),
        (merge_main, "asymvlm-merge", ["--inputs", MISSING, "--output_dir", "m", "--dens", "0.2"], "--dens"),
        (federate_main, "asymvlm-federate", ["--recipe", "fedavg", "--qffl_q", "0.5", "--cache_dir", MISSING],
         "unknown option 'qffl_q' for recipe 'fedavg'"),
        (federate_main, "asymvlm-federate", ["--dp_noise_multiplier", "-1", "--cache_dir", MISSING],
         "dp_noise_multiplier must be >= 0"),
        (federate_main, "asymvlm-federate", ["--recipe", "krum", "--dp_noise_multiplier", "1", "--cache_dir", MISSING],
         "cannot be combined with 'krum'"),
        (federate_main, "asymvlm-federate", ["--min_clients", "9", "--num_clients", "8", "--cache_dir", MISSING],
         "min_clients=9 exceeds"),
        (federate_main, "asymvlm-federate", ["--local_batch_size", "0", "--cache_dir", MISSING],
         "local_batch_size must be >= 1"),
        (federate_main, "asymvlm-federate", ["--keep_last", "0", "--cache_dir", MISSING], "keep_last must be"),
        (merge_main, "asymvlm-merge", ["--inputs", MISSING, "--output_dir", "m", "--weights", "1", "nan"], ""),
    ],
)  # fmt: skip
def test_known_holes_are_one_line_errors(main, prog, argv, expect, tmp_path_factory):
    check(main, prog, argv, tmp_path_factory, expect)
