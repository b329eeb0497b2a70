"""Nothing runs from a file: a planted pickle payload in any file of a training or federated
checkpoint never executes on --resume (a clear error, or a clean resume that ignores a foreign
file), and no package code can unpickle."""

import ast
import pickle
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(Payload(marker)))


def cache(tmp_path):
    from asymvlm.cache import write_cache

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=-1)
    idx = torch.arange(40).repeat_interleave(2)
    txt = torch.nn.functional.normalize(img[idx] + 0.3 * torch.randn(80, 8, generator=g), dim=-1)
    write_cache(tmp_path / "cache", img, txt, idx)
    return tmp_path / "cache"


def train_cfg(c, out, **kw):
    from asymvlm.training.config import TrainConfig

    base = dict(cache_dir=str(c), hidden_dims=[8], max_steps=4, batch_size=16, save_every=2, eval_every=-1,
                log_with="none", progress=False, output_dir=str(out), optimizer="adamw", lr=1e-3)  # fmt: skip
    return TrainConfig.from_dict({**base, **kw})


def test_planted_payloads_in_a_training_checkpoint_never_run(tmp_path):
    from asymvlm.errors import ArtefactError
    from asymvlm.training.loop import train

    c = cache(tmp_path)
    out = tmp_path / "run"
    train(train_cfg(c, out))
    ckpt = out / "checkpoints" / "checkpoint-00000004"
    files = sorted(p.name for p in ckpt.iterdir())
    assert files and not any(f.endswith((".pkl", ".bin", ".pt")) for f in files)  # nothing pickle-shaped written
    marker = tmp_path / "pwned"
    for name in [*files, "custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"]:
        original = (ckpt / name).read_bytes() if (ckpt / name).is_file() else None
        plant(ckpt / name, marker)
        try:
            train(train_cfg(c, out, resume=True))  # a foreign extra file: ignored, a clean resume
            assert original is None, f"a planted {name} was accepted"
        except ArtefactError as err:
            assert original is not None and name in str(err) or "checkpoint" in str(err), (name, err)
        assert not marker.exists(), f"a payload planted in {name} ran"
        if original is None:
            (ckpt / name).unlink()
        else:
            (ckpt / name).write_bytes(original)
        for later in sorted((out / "checkpoints").iterdir()):  # a clean resume wrote newer ones: drop them
            if later.name != ckpt.name:
                import shutil

                shutil.rmtree(later)


def test_planted_payloads_in_a_federated_checkpoint_never_run(tmp_path):
    from asymvlm.config import DataArguments
    from asymvlm.errors import ArtefactError
    from asymvlm.federated.config import FederatedArguments
    from asymvlm.federated.data import get_federated_data
    from asymvlm.federated.rounds import run_federated
    from asymvlm.heads import HeadConfig

    c = cache(tmp_path)
    out = tmp_path / "fed"

    def run(**kw):
        fed = FederatedArguments(rounds=2, num_clients=2, local_steps=2, local_batch_size=8, progress=False,
                                 output_dir=str(out), recipe="fedadam", **kw)  # fmt: skip
        return run_federated(fed, get_federated_data(DataArguments(cache_dir=str(c)), fed),
                             head=HeadConfig(hidden_dims=[8]))  # fmt: skip

    run()
    latest = out / "checkpoints" / "round-000002"
    marker = tmp_path / "pwned"
    for name in sorted(p.name for p in latest.iterdir()):
        original = (latest / name).read_bytes()
        plant(latest / name, marker)
        try:
            run(resume=True)
            assert name.startswith("."), f"a planted {name} was accepted"  # only the listing is never read back
        except ArtefactError as err:
            assert name in str(err) or "corrupt" in str(err), (name, err)
        assert not marker.exists(), f"a payload planted in {name} ran"
        (latest / name).write_bytes(original)


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, owner, name


def test_no_package_code_can_unpickle():
    bad = []
    for folder in ("asymvlm", "federated", "merging", "training", "eval"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    if any(m.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib", "shelve") for m in mods):
                        bad.append(f"{path}:{node.lineno} imports {mods}")
            for node, owner, name in _calls(tree):
                kw = {k.arg: k.value for k in node.keywords}
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if name in ("register_for_checkpointing", "save_state", "load_state") and owner != "self":
                    bad.append(f"{where}: accelerate's {name} pickles state")
                if owner == "torch" and name == "load":
                    wo = kw.get("weights_only")
                    if not (isinstance(wo, ast.Constant) and wo.value is True):
                        bad.append(f"{where}: torch.load without weights_only=True")
                if isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is False:
                    bad.append(f"{where}: weights_only=False")
    assert not bad, "\n".join(bad)
