"""Packaging: the five repository folders install as ONE import name, ``asymvlm``; imports stay light."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"asymvlm", "federated", "merging", "training", "eval"}
SUBPACKAGES = ("federated", "merging", "training", "eval")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # build from a copy of the sources so the checkout gets no build/ or egg-info litter
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", *sorted(FOLDERS)):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    # decoys that a careless "eval*"/"tests*" glob would pick up
    (src / "evaluation_scratch").mkdir()
    (src / "evaluation_scratch" / "__init__.py").write_text("")
    (src / "tests").mkdir()
    (src / "tests" / "__init__.py").write_text("")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
    )
    (whl,) = out.glob("asymvlm-*.whl")
    return whl


def test_the_wheels_only_top_level_name_is_asymvlm(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"asymvlm"}
    for sub in SUBPACKAGES:
        assert f"asymvlm/{sub}/__init__.py" in names
    assert "asymvlm/special.py" in names and "asymvlm/federated/core/__init__.py" in names
    # every module of the five folders is in the wheel, under asymvlm/
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).as_posix()
            assert (f"asymvlm/{rel}" if folder == "asymvlm" else f"asymvlm/{folder}/{rel}") in names, rel


def test_the_editable_install_imports_the_repository_modules(tmp_path):
    # run from an unrelated folder that has its own `training/` and `eval/` (a typical research repo):
    # they must not be what `asymvlm.training` / `asymvlm.eval` import
    for name in ("training", "eval", "federated", "merging"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise RuntimeError('the user folder was imported')\n")
    code = (
        "import asymvlm.federated.core, asymvlm.merging.methods, asymvlm.training.config, asymvlm.eval.retrieval, "
        "asymvlm.special; "
        "print('|'.join(m.__file__ for m in (asymvlm.federated.core, asymvlm.merging.methods, "
        "asymvlm.training.config, asymvlm.eval.retrieval, asymvlm.special)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    files = [Path(f).resolve() for f in out.stdout.strip().split("|")]
    assert files == [
        ROOT / "federated" / "core" / "__init__.py",
        ROOT / "merging" / "methods.py",
        ROOT / "training" / "config.py",
        ROOT / "eval" / "retrieval.py",
        ROOT / "asymvlm" / "special.py",
    ]
    # and the user's own folders still import as theirs
    mine = subprocess.run([sys.executable, "-c", "import training"], cwd=tmp_path, capture_output=True, text=True)
    assert "the user folder was imported" in mine.stderr


def test_import_asymvlm_does_not_pull_the_hf_stack():
    # `import peft` / transformers cost seconds; the core must not import them
    code = "import sys, asymvlm; print([m for m in ('peft', 'transformers', 'open_clip') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == "[]"


def test_eval_package_does_not_shadow_the_builtin():
    import builtins

    from asymvlm.eval import __all__ as eval_all  # the supported spelling

    assert isinstance(eval_all, list)
    assert builtins.eval("1 + 1") == 2


def test_subpackages_re_export_their_public_api_without_the_hf_stack():
    code = (
        "import sys\n"
        "from asymvlm.federated import WeightedMean, make_recipe, server_update, run_federated\n"
        "from asymvlm.merging import merge, merge_params, METHODS\n"
        "from asymvlm.eval import evaluate, t2i_recall_at_1\n"
        "from asymvlm.training import TrainConfig\n"
        "print([m for m in ('peft', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == "[]"
    import importlib

    for sub in SUBPACKAGES:
        mod = importlib.import_module(f"asymvlm.{sub}")
        assert mod.__all__, sub
        for name in mod.__all__:
            assert getattr(mod, name) is not None, (sub, name)
        with pytest.raises(AttributeError):
            mod.no_such_name  # noqa: B018
