"""README.md is a contract: every python block runs, and every shell command in it is run here (with
smaller sizes) or by a named test / CI."""

import json
import re
import shlex
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the message says which block
            raise AssertionError(f"README python block {i} failed: {err!r}\n{code}") from err


# ------------------------------------------------------------------------------------------------
# shell commands
# ------------------------------------------------------------------------------------------------
def readme_commands() -> list[list[str]]:
    """Every command of every ```bash block, continuation lines joined, comments dropped."""
    out = []
    # the Flower recipe between its markers is run exactly as written, processes and all, by
    # tests/test_flower_deployment.py::test_the_readmes_flower_recipe_runs_as_written
    text = re.sub(r"<!-- flower-recipe:start -->.*?<!-- flower-recipe:end -->", "", README.read_text(), flags=re.S)
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                out.append(tokens)
    return out


def yaml_files() -> dict[str, str]:
    """The ```yaml blocks, by the file name their first comment gives (``# exp.yaml: ...``)."""
    files = {}
    for block in re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S):
        name = re.match(r"#\s*([\w.-]+\.yaml)", block)
        assert name, f"a README yaml block does not start with '# <file>.yaml': {block[:60]!r}"
        files[name.group(1)] = block
    return files


# Commands run by another test (it runs the same program with the same flags on local fixtures) or
# by CI; the test (or the class a test runs) named must exist and contain every flag of the README's command.
ELSEWHERE = {
    ("make", "test"): (".ci/run", None),
    ("make", "demo"): ("tests/test_demo.py", "test_quick_demo_writes_the_report"),
    ("accelerate", "launch"): ("tests/test_training.py", "test_two_cpu_processes_train_the_same_model_as_one"),
    # servers run until stopped: started on loopback by tests/test_serve.py with these flags
    ("asymvlm-serve", "--model"): ("tests/test_serve.py", "test_a_real_server_on_loopback_writes_nothing_but_its_log"),
    ("asymvlm-serve", "--demo"): ("tests/test_serve.py", "test_the_demo_server_builds_what_it_needs"),
    **{
        # started by LoopbackDeployment, which tests/test_flower_deployment.py runs
        cmd: ("federated/flower_deploy.py", name)
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
    "eval": {"--images": "60"},  # python -m asymvlm.toyclip eval
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
    """The other half of the contract: nothing in the README's shell blocks goes unrun."""
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
            assert tokens[0] in scripts or tokens[:3] == ["python", "-m", "asymvlm.toyclip"], (
                f"README command {' '.join(tokens)!r} is neither run by the walkthrough nor covered elsewhere"
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

    from asymvlm import shapeworld as sw

    root.mkdir(parents=True)
    w = sw.generate_arrays(12, seed=3)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(12):
            Image.fromarray(w.images[i]).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "captions": list(w.captions[i])}) + "\n")


@pytest.mark.slow
def test_readme_commands_run(tmp_path, monkeypatch, capsys, quick_toy_cache, tiny_open_clip_dir):
    """The command-line section, in order, in an empty folder (toy CLIP: the --quick one)."""
    from asymvlm import toyclip

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
        if tokens[:3] == ["python", "-m", "asymvlm.toyclip"]:
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
    """Commands quoted inline in the prose: make targets exist, bench scripts exist, and every flag
    quoted for a console script is one of its flags."""
    text = README.read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in set(re.findall(r"`make ([a-z-]+)`", text)):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"README names `make {target}`, not in the Makefile"
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
            assert flag in helps[key], f"README quotes `{name} {args}` but {key} has no {flag}"
