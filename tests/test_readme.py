"""README.md and the documentation site's pages (docs/**/*.md) are a contract: every python block
runs, and every shell command in them is run here (with smaller sizes) or by a named test / CI.

Conventions, the same on every page: a ```python block runs (README.md's in one namespace, in
order; each docs page's in a namespace of its own, in order, in an empty folder); the commands of a
```bash block are run by the walkthrough below (console scripts, with SMALL sizes) or by the test
ELSEWHERE names; a ```bash block right after ``<!-- docs-test: shell -->`` runs as written with
bash in the repository root, the virtual environment's; the Flower recipe between
``<!-- flower-recipe:start -->`` and ``<!-- flower-recipe:end -->`` is run by
tests/federated/flower/test_flower_deployment.py; ```text and plain ``` blocks are shown, not run
(output, requests to a running server, calls that need the network). A command or block that
README.md and a page both carry runs once.
"""

import json
import os
import re
import shlex
import subprocess
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SHELL_MARK = "<!-- docs-test: shell -->"
FLOWER_RECIPE = r"<!-- flower-recipe:start -->.*?<!-- flower-recipe:end -->"


def doc_pages() -> list[Path]:
    """The site's pages in mkdocs.yml's nav order, then any page the nav does not list (the strict
    build rejects those; here they still run)."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def walk(entry) -> list[str]:
        if isinstance(entry, str):
            return [entry]
        if isinstance(entry, list):
            return [p for e in entry for p in walk(e)]
        return [p for v in entry.values() for p in walk(v)]

    listed = [DOCS / p for p in walk(nav) if (DOCS / p).is_file()]
    return listed + sorted(set(DOCS.rglob("*.md")) - set(listed))


PAGES = doc_pages()
SOURCES = [README, *PAGES]


def label(path: Path) -> str:
    return str(path.relative_to(ROOT))


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def run_blocks(path: Path, blocks: list[str]) -> None:
    namespace: dict = {}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{label(path)} python block {i}", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message says which block
            raise AssertionError(f"{label(path)} python block {i} failed: {err!r}\n{code}") from err


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks(README)
    assert len(blocks) + sum(len(python_blocks(p)) for p in PAGES) >= 8
    monkeypatch.chdir(tmp_path)
    run_blocks(README, blocks)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=label)
def test_docs_python_blocks_run(page, tmp_path, monkeypatch, capsys):
    """Each page's blocks in order, in a namespace of their own: a page never leans on another."""
    monkeypatch.chdir(tmp_path)
    run_blocks(page, python_blocks(page))


def shell_blocks(path: Path) -> list[str]:
    return re.findall(re.escape(SHELL_MARK) + r"\s*```bash\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.slow  # du over the environment: seconds to a minute on a busy disk
@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "activate").is_file(), reason="no .venv (make install creates it)")
def test_docs_shell_blocks_run_as_written():
    """The blocks marked ``<!-- docs-test: shell -->`` (activating the environment, measuring the
    disk) run with bash in the repository root, as a user would paste them."""
    blocks = [(p, b) for p in SOURCES for b in shell_blocks(p)]
    assert blocks
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    for block, path in {b: p for p, b in reversed(blocks)}.items():  # each block once, where it first appears
        cmd = ["bash", "-euo", "pipefail", "-c", block]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (
            f"{label(path)}: shell block failed\n{block}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )


def test_the_flower_recipe_of_the_docs_is_the_one_that_runs():
    """tests/federated/flower/test_flower_deployment.py runs docs/guide/flower.md's recipe as written;
    any other page (or README.md) that shows the recipe shows that one, character for character."""
    ran = re.findall(FLOWER_RECIPE, (ROOT / "docs" / "guide" / "flower.md").read_text(), flags=re.S)
    assert len(ran) == 1, "docs/guide/flower.md must show the Flower recipe the deployment test runs, once"
    for page in SOURCES:
        for recipe in re.findall(FLOWER_RECIPE, page.read_text(), flags=re.S):
            assert recipe == ran[0], f"{label(page)}'s Flower recipe differs from the one the deployment test runs"


# ------------------------------------------------------------------------------------------------
# shell commands
# ------------------------------------------------------------------------------------------------
def commands(path: Path) -> list[list[str]]:
    """Every command of every ```bash block, continuation lines joined, comments dropped (the Flower
    recipe and the blocks run as written left out: other tests run them)."""
    out = []
    # the Flower recipe between its markers is run exactly as written, processes and all, by
    # tests/federated/flower/test_flower_deployment.py::test_the_docs_flower_recipe_runs_as_written
    text = re.sub(FLOWER_RECIPE, "", path.read_text(), flags=re.S)
    text = re.sub(re.escape(SHELL_MARK) + r"\s*```bash\n.*?```", "", text, flags=re.S)
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                out.append(tokens)
    return out


def readme_commands() -> list[list[str]]:
    """The commands of README.md and then of the pages in nav order, each once."""
    seen = {}
    for path in SOURCES:
        for tokens in commands(path):
            seen.setdefault(tuple(tokens), tokens)
    return list(seen.values())


def yaml_files() -> dict[str, str]:
    """The ```yaml blocks, by the file name their first comment gives (``# exp.yaml: ...``); a file
    shown on several pages is shown the same everywhere."""
    files: dict[str, str] = {}
    for path in SOURCES:
        for block in re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S):
            name = re.match(r"#\s*([\w.-]+\.yaml)", block)
            assert name, f"a {label(path)} yaml block does not start with '# <file>.yaml': {block[:60]!r}"
            assert files.setdefault(name.group(1), block) == block, f"{label(path)} shows another {name.group(1)}"
    return files


# Commands run by another test (it runs the same program with the same flags on local fixtures) or
# by CI; the test (or the class a test runs) named must exist and contain every flag of the README's command.
ELSEWHERE = {
    ("make", "test"): (".ci/run", None),
    ("make", "demo"): ("tests/training/test_demo.py", "test_quick_demo_writes_the_report"),
    ("accelerate", "launch"): ("tests/training/test_training.py", "test_two_cpu_processes_train_the_same_model_as_one"),
    # servers run until stopped: started on loopback by tests/serve/test_serve.py with these flags
    ("asymvlm-serve", "--model"): (
        "tests/serve/test_serve.py",
        "test_a_real_server_on_loopback_writes_nothing_but_its_log",
    ),
    ("asymvlm-serve", "--demo"): ("tests/serve/test_serve.py", "test_the_demo_server_builds_what_it_needs"),
    ("asymvlm-demo", "--serve"): ("tests/serve/test_serve.py", "test_the_demo_server_builds_what_it_needs"),
    **{
        # started by LoopbackDeployment, which tests/federated/flower/test_flower_deployment.py runs
        cmd: ("asymvlm/testing/flower_deploy.py", name)
        for cmd, name in (
            (("flower-superlink", "--ssl-ca-certfile"), "LoopbackDeployment"),
            (("flower-supernode", "--root-certificates"), "LoopbackDeployment"),
            (("flwr", "run"), "LoopbackDeployment"),
        )
    },
}

# Sizes the walkthrough shrinks to (the flag's value is replaced, or the flag appended).
SMALL = {
    "asymvlm-train": {"--train_images": "600", "--max_steps": "4", "--batch_size": "256"},
    "asymvlm-federate": {"--train_images": "600", "--rounds": "1", "--local_steps": "1", "--num_clients": "3"},
    "asymvlm-eval": {"--images": "60"},
    "eval": {"--images": "60"},  # python -m asymvlm.worlds.toyclip eval
}
SMALL_YAML = {"max_steps": "4", "batch_size": "256", "save_every": "2", "eval_every": "-1", "rounds": "1",
              "local_steps": "1", "train_images": "600", "num_clients": "3"}  # fmt: skip


def shrink(tokens: list[str], key: str) -> list[str]:
    """Replace the value of each of SMALL[key]'s flags, or append the flag (flags override YAML)."""
    tokens = list(tokens)
    for flag, value in SMALL.get(key, {}).items():
        if flag in tokens:
            tokens[tokens.index(flag) + 1] = value
        else:
            tokens += [flag, value]
    return tokens


def test_every_readme_command_is_covered():
    """The other half of the contract: nothing in the shell blocks of README.md and the docs goes unrun."""
    scripts = {ep.name for ep in entry_points(group="console_scripts") if ep.value.split(".")[0] in _PACKAGES}
    for tokens in readme_commands():
        if tuple(tokens[:2]) in ELSEWHERE:
            path, name = ELSEWHERE[tuple(tokens[:2])]
            text = (ROOT / path).read_text()
            if name is None:
                assert " ".join(tokens) in text, f"{path} does not run {' '.join(tokens)}"
            else:
                head = f"def {name}(" if f"def {name}(" in text else f"class {name}"
                body = text[text.index(head) :]
                ends = [i for i in (body.find("\ndef ", 1), body.find("\nclass ", 1)) if i > 0]
                body = body[: min(ends)] if ends else body
                flags = [t for t in tokens[2:] if t.startswith("--")]
                missing = [f for f in flags if f.strip("-") not in body]
                assert not missing, f"{path}::{name} does not exercise {missing} of {' '.join(tokens)}"
        else:
            assert tokens[0] in scripts or tokens[:3] == ["python", "-m", "asymvlm.worlds.toyclip"], (
                f"documented command {' '.join(tokens)!r} is neither run by the walkthrough nor covered elsewhere"
            )


_PACKAGES = ("asymvlm", "training", "federated", "merging", "eval")


def _write_checkpoints(d: Path) -> None:
    """vit.safetensors + two fine-tuned copies, and two peft LoRA adapters of one tiny base."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {"blocks.0.weight": torch.randn(16, 8, generator=g), "blocks.0.bias": torch.randn(16, generator=g)}
    save_file(base, str(d / "vit.safetensors"))
    for i in (1, 2):
        tuned = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(tuned, str(d / f"ft{i}.safetensors"))
    for name, seed in (("adapter-a", 1), ("adapter-b", 2)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        torch.manual_seed(seed)
        cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
        get_peft_model(model, cfg).save_pretrained(str(d / name))


def _write_image_folder(root: Path) -> None:
    from PIL import Image

    from asymvlm.worlds import shapeworld as sw

    root.mkdir(parents=True)
    w = sw.generate_arrays(12, seed=3)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(12):
            Image.fromarray(w.images[i]).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "captions": list(w.captions[i])}) + "\n")


@pytest.mark.slow
def test_readme_commands_run(tmp_path, monkeypatch, capsys, quick_toy_cache, tiny_open_clip_dir):
    """The command-line sections (README.md's, then the pages'), in order, in an empty folder (toy CLIP:
    the --quick one)."""
    from asymvlm.worlds import toyclip

    monkeypatch.setenv("ASYMVLM_CACHE", str(quick_toy_cache))
    monkeypatch.chdir(tmp_path)
    for name, text in yaml_files().items():
        for key, value in SMALL_YAML.items():
            text = re.sub(rf"^{key}:\s*\S+", f"{key}: {value}", text, flags=re.M)
        Path(name).write_text(text)
    _write_checkpoints(tmp_path)
    _write_image_folder(tmp_path / "data" / "captions")
    # the one command that names a pretrained model we cannot download: the tiny open_clip instead
    swap = {"open_clip:ViT-B-32": f"open_clip:local-dir:{tiny_open_clip_dir}", "openai": ""}
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts")}
    ran, seconds = [], []
    for tokens in readme_commands():
        if tuple(tokens[:2]) in ELSEWHERE:
            continue
        tokens = [swap.get(t, t) for t in tokens]
        if tokens[:3] == ["python", "-m", "asymvlm.worlds.toyclip"]:
            main, argv = toyclip.main, shrink(tokens[3:], tokens[3])
        else:
            main, argv = scripts[tokens[0]].load(), shrink(tokens[1:], tokens[0])
        start = time.perf_counter()
        code = main(argv)
        seconds.append((round(time.perf_counter() - start, 1), " ".join(tokens[:3])))
        out = capsys.readouterr()
        assert code in (0, None), f"{' '.join(tokens)} exited with {code}\n{out.out[-2000:]}\n{out.err[-2000:]}"
        ran.append(" ".join(tokens[:2]))
    assert len(ran) >= 15, ran
    with capsys.disabled():
        print("\nREADME commands (seconds):", seconds)
    # what the commands promise to leave behind
    for path in ("runs/vmf/model", "runs/exp/model", "runs/fedavg/model", "runs/fedadam/model", "merged/ties",
                 "galleries/captions/gallery.json",
                 "merged/task-arithmetic", "merged/dare", "merged/adapter", "eval-out/metrics.json",
                 "eval-vitb32/metrics.json", "eval-fedavg/metrics.json"):  # fmt: skip
        assert (tmp_path / path).exists(), path
    merge_info = json.loads((tmp_path / "merged/adapter/merge.json").read_text())
    assert merge_info["method"] == "ties"


def test_inline_commands_name_real_targets_files_and_flags(capsys):
    """Commands quoted inline in the prose of README.md and the docs: make targets exist, bench
    scripts exist, and every flag quoted for a console script is one of its flags."""
    text = "\n".join(p.read_text() for p in SOURCES)
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"`make ([a-z-]+)`", text)):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"the docs name `make {target}`, not in the Makefile"
    scripts = set(re.findall(r"`python (bench/[a-z_]+\.py)", text))
    assert len(scripts) >= 6
    for script in scripts:
        assert (ROOT / script).is_file(), script
    eps = {ep.name: ep for ep in entry_points(group="console_scripts")}
    helps: dict[str, str] = {}
    for name, args in re.findall(r"`(asymvlm-[a-z]+) ([^`]*)`", text):
        sub = args.split()[0] if args.split() and re.fullmatch(r"[a-z]+", args.split()[0]) else None
        key = f"{name} {sub}" if sub else name  # a subcommand (asymvlm-index build): its own --help
        if key not in helps:
            try:
                code = eps[name].load()([sub, "--help"] if sub else ["--help"])
            except SystemExit as exit_:
                code = exit_.code
            assert code in (0, None), key
            helps[key] = capsys.readouterr().out
        for flag in re.findall(r"--[a-z][a-z_-]*", args):
            assert flag in helps[key], f"the docs quote `{name} {args}` but {key} has no {flag}"
