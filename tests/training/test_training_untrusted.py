"""Issue 26: what training and merging read from outside is untrusted.

* a tampered training checkpoint (trainer state, scheduler, optimizer, parameters) is one
  :class:`ArtefactError` naming the file and the field, before anything trains; a sound one
  resumes exactly as before;
* ``--overwrite`` removes only what asymvlm wrote into ``model/``;
* a merge refuses an expert that was not fine-tuned from the given base, and reads task vectors,
  checkpoints and expert folders as untrusted (keys, shapes, dtypes, NaN): one clear error naming
  the file and the key, nothing written.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from asymvlm.errors import ArtefactError, ConfigError, MergeInputError
from asymvlm.training.config import TrainConfig
from asymvlm.training.loop import latest_checkpoint, train


# ------------------------------------------------------------------------------------------
# training checkpoints
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, synthetic_cache):
    return synthetic_cache(tmp_path_factory.mktemp("cache") / "c", 32, dim=8, captions=True)


def config(cache_dir, out, **kw):
    base = dict(cache_dir=str(cache_dir), hidden_dims=[8], max_steps=8, batch_size=16, save_every=4,
                output_dir=str(out), progress=False, log_with="none", optimizer="adamw", lr=1e-2, log_every=1,
                eval_every=-1, fit_confidence=False)  # fmt: skip
    base.update(kw)
    return TrainConfig.from_dict(base)


@pytest.fixture(scope="module")
def finished(cache_dir, tmp_path_factory):
    """A full AdamW run (checkpoints at 4 and 8) and an SGD one, each with its final weights."""
    runs = {}
    for opt in ("adamw", "sgd"):
        out = tmp_path_factory.mktemp("runs") / opt
        extra = {"momentum": 0.9} if opt == "sgd" else {}
        model = train(config(cache_dir, out, optimizer=opt, **extra))
        runs[opt] = (out, load_file(Path(model) / "head.safetensors"))
    return runs


def interrupted(finished, tmp_path, opt="adamw"):
    """A copy of a finished run that stopped after its checkpoint of step 4."""
    src, _ = finished[opt]
    out = tmp_path / "run"
    shutil.copytree(src, out)
    shutil.rmtree(out / "model")
    shutil.rmtree(out / "checkpoints" / "checkpoint-00000008")
    return out, out / "checkpoints" / "checkpoint-00000004"


def edit_json(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def edit_tensors(path, fn):
    tensors = dict(load_file(path))
    fn(tensors)
    save_file(tensors, path)


def resume(cache_dir, out, opt="adamw"):
    extra = {"momentum": 0.9} if opt == "sgd" else {}
    return train(config(cache_dir, out, optimizer=opt, resume=True, **extra))


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_a_sound_checkpoint_resumes_exactly(cache_dir, finished, tmp_path, opt):
    out, _ = interrupted(finished, tmp_path, opt)
    model = resume(cache_dir, out, opt)
    got = load_file(Path(model) / "head.safetensors")
    want = finished[opt][1]
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _set(key, value):
    return lambda doc: doc.__setitem__(key, value)


def _sched(key, value):
    return lambda doc: doc["state"].__setitem__(key, value)


def _group(key, value):
    def fn(doc):
        doc["skeleton"]["__dict__"]["param_groups"]["__list__"][0]["__dict__"][key] = value

    return fn


def _tensor(key, fn):
    def edit(t):
        t[key] = fn(t[key])

    return edit


def _first_state(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def _opt_tensor(suffix, fn):
    def edit(t):
        k = _first_state(t, suffix)
        t[k] = fn(t[k])

    return edit


def _first_param(tensors):
    return sorted(k for k in tensors if k.startswith("head.") and tensors[k].ndim == 2)[0]


def _param(fn):
    def edit(t):
        k = _first_param(t)
        t[k] = fn(t[k])

    return edit


def _nan_first(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


# (file, edit, what the message must name)
TRAINER_STATE = [
    (_set("step", -5), "step"),
    (_set("step", 1000000), "step"),
    (_set("step", 8), "step"),  # another step than the folder's: would save checkpoint 4 as the final model
    (_set("step", None), "step"),
    (_set("step", "5"), "step"),
    (_set("step", 5.5), "step"),
    (_set("step", True), "step"),
    (lambda d: d.pop("step"), "step"),
    (_set("config", [1, 2]), "config"),
]
SCHEDULER = [
    (_sched("optimizer", {"x": 1}), "optimizer"),  # an extra key written over an attribute
    (_sched("__dict__", {}), "__dict__"),
    (lambda d: d["state"].pop("last_epoch"), "last_epoch"),
    (_sched("last_epoch", 1000000), "last_epoch"),
    (_sched("last_epoch", -5), "last_epoch"),
    (_sched("last_epoch", "4"), "last_epoch"),
    (_sched("base_lrs", [1e30]), "base_lrs"),
    (_sched("base_lrs", "x"), "base_lrs"),
    (_sched("_last_lr", [float("nan")]), "_last_lr"),
    (_sched("lr_lambdas", [{"a": 1}]), "lr_lambdas"),
    (_set("state", [1]), "state"),
]
OPTIMIZER_JSON = [
    (_group("lr", float("nan")), "lr"),
    (_group("lr", "0.1"), "lr"),
    (_group("lr", -1.0), "lr"),
    (_group("weight_decay", 1e30), "weight_decay"),
    (_group("betas", {"__list__": [0.9, 2.0], "tuple": True}), "betas"),
    (_group("params", {"__list__": [0], "tuple": False}), "params"),
    (_group("momentum_of_nothing", 1), "momentum_of_nothing"),
    (lambda d: d["skeleton"]["__dict__"]["param_groups"]["__list__"].pop(), "param_groups"),
    (_set("skeleton", [1]), "skeleton"),
    (lambda d: d["skeleton"]["__dict__"]["state"]["__dict__"].__setitem__("99", {"__dict__": {}}), "99"),
]
OPTIMIZER_TENSORS = [
    (_opt_tensor("/exp_avg", lambda t: torch.zeros(3)), "exp_avg"),  # wrong shape
    (_opt_tensor("/exp_avg", lambda t: t.reshape(-1)), "exp_avg"),  # same numel, other shape
    (_opt_tensor("/exp_avg", _nan_first), "exp_avg"),
    (_opt_tensor("/exp_avg_sq", lambda t: -t - 1), "exp_avg_sq"),  # negative second moment: sqrt NaN
    (_opt_tensor("/exp_avg", lambda t: t.to(torch.int64)), "exp_avg"),
    (_opt_tensor("/exp_avg", lambda t: t.double()), "exp_avg"),
    (_opt_tensor("/step", lambda t: torch.tensor(float("nan"))), "step"),
    (_opt_tensor("/step", lambda t: torch.tensor(-3.0)), "step"),
    (_opt_tensor("/step", lambda t: torch.tensor(1e6)), "step"),
    (_opt_tensor("/step", lambda t: torch.zeros(2)), "step"),
]
TRAINABLE = [
    (_param(_nan_first), "head."),
    (_param(lambda t: t * float("inf")), "head."),
    (_param(lambda t: t.to(torch.int32)), "head."),
    (_param(lambda t: t.double()), "head."),
    (_param(lambda t: t.reshape(-1)), "head."),
]
CASES = (
    [("trainer_state.json", "json", e, n) for e, n in TRAINER_STATE]
    + [("scheduler.json", "json", e, n) for e, n in SCHEDULER]
    + [("optimizer.json", "json", e, n) for e, n in OPTIMIZER_JSON]
    + [("optimizer.safetensors", "tensors", e, n) for e, n in OPTIMIZER_TENSORS]
    + [("trainable.safetensors", "tensors", e, n) for e, n in TRAINABLE]
)


@pytest.mark.parametrize("name,kind,edit,field", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_a_tampered_checkpoint_is_one_error_naming_file_and_field(cache_dir, finished, tmp_path, name, kind, edit,
                                                                  field):  # fmt: skip
    out, ckpt = interrupted(finished, tmp_path)
    (edit_json if kind == "json" else edit_tensors)(ckpt / name, edit)
    with pytest.raises(ArtefactError) as err:
        resume(cache_dir, out)
    msg = str(err.value)
    assert name in msg and field in msg, msg
    assert "\n" not in msg
    assert not (out / "model").exists()  # nothing trained, nothing saved
    assert latest_checkpoint(out).name == "checkpoint-00000004"


def test_a_tampered_sgd_momentum_buffer_is_an_error(cache_dir, finished, tmp_path):
    for fn in (lambda t: torch.zeros(5), _nan_first):
        out, ckpt = interrupted(finished, tmp_path / str(id(fn)), "sgd")
        edit_tensors(ckpt / "optimizer.safetensors", _opt_tensor("/momentum_buffer", fn))
        with pytest.raises(ArtefactError, match=r"optimizer\.safetensors.*momentum_buffer"):
            resume(cache_dir, out, "sgd")


def test_the_checkpoint_step_must_be_that_of_its_folder(cache_dir, finished, tmp_path):
    out, ckpt = interrupted(finished, tmp_path)
    ckpt.rename(ckpt.with_name("checkpoint-00000006"))  # folder and state disagree
    with pytest.raises(ArtefactError, match=r"trainer_state\.json.*step"):
        resume(cache_dir, out)


# ------------------------------------------------------------------------------------------
# --overwrite keeps the user's files
# ------------------------------------------------------------------------------------------
def test_overwrite_keeps_the_users_files_inside_model(cache_dir, tmp_path, caplog):
    out = tmp_path / "run"
    train(config(cache_dir, out, max_steps=2, save_every=0))
    (out / "model" / "my-notes.txt").write_text("mine")
    (out / "model" / "results").mkdir()
    (out / "model" / "results" / "r.csv").write_text("1,2")
    (out / "checkpoints" / "keep.txt").write_text("mine too")
    (out / "notes.md").write_text("mine as well")
    with caplog.at_level("WARNING"):
        model = train(config(cache_dir, out, max_steps=2, save_every=0, overwrite=True))
    assert (model / "my-notes.txt").read_text() == "mine"
    assert (model / "results" / "r.csv").read_text() == "1,2"
    assert (out / "checkpoints" / "keep.txt").read_text() == "mine too"
    assert (out / "notes.md").read_text() == "mine as well"
    assert (model / "head.safetensors").is_file()
    assert "my-notes.txt" in caplog.text and "kept" in caplog.text


def test_overwrite_refuses_a_model_folder_asymvlm_did_not_write(cache_dir, tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match=r"model.*thesis\.tex"):
        train(config(cache_dir, out, max_steps=2, save_every=0, overwrite=True))
    assert (out / "model" / "thesis.tex").read_text() == "years of work"


# ------------------------------------------------------------------------------------------
# merging: an expert that was not fine-tuned from the base
# ------------------------------------------------------------------------------------------
def test_a_head_trained_from_scratch_is_not_merged_against_a_base(cache_dir, tmp_path, capsys):
    from asymvlm.merging.cli import main
    from asymvlm.model import AsymVLM

    base = train(config(cache_dir, tmp_path / "base", max_steps=2, save_every=0))
    tuned = train(config(cache_dir, tmp_path / "tuned", max_steps=2, save_every=0, init_from=str(base)))
    scratch = train(config(cache_dir, tmp_path / "scratch", max_steps=2, save_every=0, seed=7))
    assert AsymVLM.from_pretrained(scratch, load_encoder=False).lineage["init_from"] is None
    out = tmp_path / "merged"
    rc = main(["--base", str(base), "--inputs", str(tuned), str(scratch), "--method", "task_arithmetic",
               "--output_dir", str(out), "--no_progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "trained from scratch" in err and str(scratch) in err and "--allow_unrelated" in err
    assert not out.exists()
    # the explicit override merges it, says so loudly and records it
    rc = main(["--base", str(base), "--inputs", str(tuned), str(scratch), "--method", "task_arithmetic",
               "--output_dir", str(out), "--no_progress", "--allow_unrelated"])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 0 and "warning" in cap.err and "trained from scratch" in cap.err
    assert any("trained from scratch" in w for w in json.loads((out / "merge.json").read_text())["warnings"])


def _heads(tmp_path, *, lineage=True, scale=0.01):
    from asymvlm.heads import TextHead
    from asymvlm.io import tensor_fingerprint
    from asymvlm.model import AsymVLM

    source = {"spec": "open_clip:toy", "fingerprint": "f" * 64, "dim": 8}
    torch.manual_seed(0)
    base = TextHead(dim=8, hidden_dims=(16,), residual=True)
    AsymVLM(base, encoder_source=dict(source), logit_scale=1.0).save_pretrained(tmp_path / "base")
    rec = {"init_from": "base", "init_from_fingerprint": tensor_fingerprint(base.state_dict())} if lineage else None
    paths = []
    for i in range(2):
        h = TextHead(dim=8, hidden_dims=(16,), residual=True)
        h.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in h.parameters():
                p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i)))
        AsymVLM(h, encoder_source=dict(source), logit_scale=1.0, lineage=rec).save_pretrained(tmp_path / f"ft{i}")
        paths.append(tmp_path / f"ft{i}")
    return tmp_path / "base", paths, source


def test_an_unrecorded_expert_far_from_the_base_is_refused(tmp_path, capsys):
    """No lineage record (older models): an expert whose difference to the base is as large as the
    weights themselves is no fine-tune of it; a near one merges with a warning the CLI prints."""
    from asymvlm.heads import TextHead
    from asymvlm.merging.api import merge
    from asymvlm.merging.cli import main
    from asymvlm.model import AsymVLM

    base, fts, source = _heads(tmp_path, lineage=False)
    torch.manual_seed(123)
    AsymVLM(TextHead(dim=8, hidden_dims=(16,), residual=True), encoder_source=dict(source),
            logit_scale=1.0).save_pretrained(tmp_path / "stranger")  # fmt: skip
    with pytest.raises(MergeInputError, match=r"stranger.*not fine-tuned from the base"):
        merge(base, [fts[0], tmp_path / "stranger"], tmp_path / "m", "task_arithmetic")
    assert not (tmp_path / "m").exists()
    rc = main(["--base", str(base), "--inputs", *map(str, fts), "--method", "task_arithmetic",
               "--output_dir", str(tmp_path / "ok"), "--no_progress"])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 0 and "does not record what it was fine-tuned from" in cap.err


# ------------------------------------------------------------------------------------------
# merging: untrusted expert folders, checkpoints and task vectors
# ------------------------------------------------------------------------------------------
def _ckpts(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i in range(2):
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  tmp_path / f"ft{i}.safetensors")  # fmt: skip
        paths.append(tmp_path / f"ft{i}.safetensors")
    return tmp_path / "base.safetensors", paths


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda t: t.__setitem__("a.weight", t["a.weight"].to(torch.int32)), ["ft1", "a.weight", "dtype"]),
        (lambda t: t.__setitem__("a.weight", t["a.weight"].double()), ["ft1", "a.weight", "dtype"]),
        (lambda t: t.__setitem__("a.weight", _nan_first(t["a.weight"])), ["ft1", "a.weight", "NaN"]),
        (lambda t: t.__setitem__("a.weight", t["a.weight"].T.contiguous()), ["ft1", "a.weight", "shape"]),
        (lambda t: t.pop("a.bias"), ["ft1", "a.bias"]),
        (lambda t: t.__setitem__("extra", torch.zeros(2)), ["ft1", "extra"]),
    ],
)
def test_untrusted_checkpoints_name_the_file_and_key(tmp_path, edit, words):
    from asymvlm.merging.api import merge

    base, fts = _ckpts(tmp_path)
    edit_tensors(fts[1], edit)
    with pytest.raises(MergeInputError) as err:
        merge(base, fts, tmp_path / "m", "task_arithmetic")
    for w in words:
        assert w in str(err.value), str(err.value)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda t: t.__setitem__("a.weight", t["a.weight"].to(torch.int32)), ["the base", "a.weight", "dtype"]),
        (lambda t: t.__setitem__("a.weight", _nan_first(t["a.weight"])), ["the base", "a.weight", "NaN"]),
    ],
)
def test_an_untrusted_base_checkpoint_names_the_file_and_key(tmp_path, edit, words):
    from asymvlm.merging.api import merge

    base, fts = _ckpts(tmp_path)
    edit_tensors(base, edit)
    with pytest.raises(MergeInputError) as err:
        merge(base, fts, tmp_path / "m", "task_arithmetic")
    for w in words:
        assert w in str(err.value), str(err.value)
    assert not (tmp_path / "m").exists()


def _task_vectors(tmp_path):
    from asymvlm.merging.task_vectors import task_vector_from_checkpoints

    base, fts = _ckpts(tmp_path)
    return base, [task_vector_from_checkpoints(base, f, tmp_path / f"tv{i}") for i, f in enumerate(fts)]


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda t: t.__setitem__("a.weight", t["a.weight"].to(torch.int64)), ["tv1", "a.weight", "dtype"]),
        (lambda t: t.__setitem__("a.weight", _nan_first(t["a.weight"])), ["tv1", "a.weight", "NaN"]),
        (lambda t: t.__setitem__("a.weight", t["a.weight"] * 1e38 * 1e38), ["tv1", "a.weight"]),
        (lambda t: t.__setitem__("a.weight", torch.zeros(12)), ["tv1", "a.weight", "shape"]),
        (lambda t: t.pop("a.bias"), ["tv1", "a.bias"]),
    ],
)
def test_untrusted_task_vectors_name_the_file_and_key(tmp_path, edit, words):
    from asymvlm.merging.api import merge

    base, tvs = _task_vectors(tmp_path)
    edit_tensors(tvs[1] / "task_vector.safetensors", edit)
    with pytest.raises(MergeInputError) as err:
        merge(base, tvs, tmp_path / "m", "task_arithmetic")
    for w in words:
        assert w in str(err.value), str(err.value)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "meta,words",
    [
        ([1, 2], ["task_vector.json"]),
        ({"type": "asymvlm.task_vector", "base_fingerprint": 5}, ["task_vector.json", "base_fingerprint"]),
        ({"type": "asymvlm.task_vector", "base_fingerprint": "0" * 64}, ["tv1", "base_fingerprint"]),
    ],
)
def test_untrusted_task_vector_sidecars(tmp_path, meta, words):
    from asymvlm.merging.api import merge

    base, tvs = _task_vectors(tmp_path)
    (tvs[1] / "task_vector.json").write_text(json.dumps(meta))
    with pytest.raises(MergeInputError) as err:
        merge(base, tvs, tmp_path / "m", "task_arithmetic")
    for w in words:
        assert w in str(err.value), str(err.value)
    assert not (tmp_path / "m").exists()


def test_task_vectors_of_another_base_are_refused(tmp_path):
    """Both vectors agree with each other, but they were computed against another base than --base."""
    from asymvlm.merging.api import merge

    base, tvs = _task_vectors(tmp_path)
    other = tmp_path / "other.safetensors"
    save_file({k: v + 1.0 for k, v in load_file(base).items()}, other)
    with pytest.raises(MergeInputError, match=r"base_fingerprint.*other\.safetensors|other\.safetensors.*base"):
        merge(other, tvs, tmp_path / "m", "task_arithmetic")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "edit,words",
    [
        (lambda t: t.__setitem__("mlp.0.weight", t["mlp.0.weight"].to(torch.int32)), ["ft1", "mlp.0.weight"]),
        (lambda t: t.__setitem__("mlp.0.weight", t["mlp.0.weight"] * float("inf")), ["ft1", "mlp.0.weight"]),
    ],
)
def test_untrusted_expert_folders_name_the_expert_and_key(tmp_path, edit, words):
    from asymvlm.merging.api import merge

    base, fts, _ = _heads(tmp_path)
    edit_tensors(fts[1] / "head.safetensors", edit)
    with pytest.raises((MergeInputError, ArtefactError)) as err:
        merge(base, fts, tmp_path / "m", "task_arithmetic")
    for w in words:
        assert w in str(err.value), str(err.value)
    assert not (tmp_path / "m").exists()


def test_a_merge_that_overflows_is_not_written(tmp_path):
    from asymvlm.merging.api import merge

    base, fts, _ = _heads(tmp_path, scale=1e37)
    with pytest.raises(MergeInputError, match=r"not finite|overflow"):
        merge(base, fts, tmp_path / "m", "task_arithmetic", lam=10.0, allow_unrelated=True)
    assert not (tmp_path / "m").exists()
    cb, cfts = _ckpts(tmp_path / "c" if (tmp_path / "c").mkdir() is None else None)
    for f in cfts:
        edit_tensors(f, lambda t: t.__setitem__("a.weight", t["a.weight"] * 1e38))
    with pytest.raises(MergeInputError, match=r"not finite|overflow"):
        merge(cb, cfts, tmp_path / "m2", "task_arithmetic", lam=1e3)
    assert not (tmp_path / "m2").exists()


def _adapters(tmp_path):
    """Two hand-written peft LoRA adapters of one layer (``fc1``: 8 x 6, rank 2)."""
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(2):
        d = tmp_path / f"ad{i}"
        d.mkdir()
        cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["fc1"], "use_rslora": False}
        (d / "adapter_config.json").write_text(json.dumps(cfg))
        save_file({"base_model.model.fc1.lora_A.weight": torch.randn(2, 6, generator=g),
                   "base_model.model.fc1.lora_B.weight": torch.randn(8, 2, generator=g)},
                  d / "adapter_model.safetensors")  # fmt: skip
        paths.append(d)
    return paths


@pytest.mark.parametrize(
    "config,words",
    [
        ([1, 2], ["ad1", "adapter_config.json", "object"]),
        ({"r": "2", "lora_alpha": 4}, ["ad1", "adapter_config.json", "r must be"]),
        ({"r": 0, "lora_alpha": 4}, ["ad1", "adapter_config.json", "r must be"]),
        ({"r": True, "lora_alpha": 4}, ["ad1", "adapter_config.json", "r must be"]),
        ({"r": 2, "lora_alpha": float("nan")}, ["ad1", "adapter_config.json", "lora_alpha"]),
        ({"r": 2, "lora_alpha": "4"}, ["ad1", "adapter_config.json", "lora_alpha"]),
        ({"r": 2, "lora_alpha": 4, "use_rslora": "yes"}, ["ad1", "adapter_config.json", "use_rslora"]),
    ],
)
@pytest.mark.parametrize("via", ["merge", "task_vector"])
def test_untrusted_lora_adapter_configs(tmp_path, config, words, via):
    from asymvlm.merging.api import merge
    from asymvlm.merging.task_vectors import task_vector_from_lora

    ads = _adapters(tmp_path)
    (ads[1] / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MergeInputError) as err:
        if via == "merge":
            merge(None, ads, tmp_path / "m", "task_arithmetic")
        else:
            task_vector_from_lora(ads[1], tmp_path / "m")
    for w in words:
        assert w in str(err.value), str(err.value)
    assert not (tmp_path / "m").exists()


def test_untrusted_lora_factors(tmp_path):
    from asymvlm.merging.api import merge
    from asymvlm.merging.task_vectors import task_vector_from_lora

    ads = _adapters(tmp_path)
    key = "base_model.model.fc1.lora_A.weight"
    int_a = torch.ones(2, 6, dtype=torch.int32)
    edit_tensors(ads[1] / "adapter_model.safetensors", lambda t: t.__setitem__(key, int_a))
    for run in (lambda: merge(None, ads, tmp_path / "m", "task_arithmetic"),
                lambda: task_vector_from_lora(ads[1], tmp_path / "m")):  # fmt: skip
        with pytest.raises(MergeInputError, match=r"ad1.*fc1.*int32"):
            run()
        assert not (tmp_path / "m").exists()


def test_a_lora_merge_that_overflows_is_not_written(tmp_path):
    from asymvlm.merging.api import merge

    ads = _adapters(tmp_path)
    for d in ads:
        edit_tensors(d / "adapter_model.safetensors", lambda t: t.update({k: v * 1e34 for k, v in t.items()}))
    with pytest.raises(MergeInputError, match=r"fc1.*not finite"):
        merge(None, ads, tmp_path / "m", "task_arithmetic", lam=1e5)
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------
# wave 2 of issue 26 (the artefact fuzzer's training_checkpoint kind)
# ------------------------------------------------------------------------------------------
def _config(key, value):
    return lambda doc: doc["config"].__setitem__(key, value)


# trainer_state.json's config: a tampered config (a key missing or unknown, a value of another JSON type)
# is an ArtefactError naming the file and key; another value is the ConfigError asking for the same
# config, naming the file too (it named only the output folder)
RESUME_CONFIG = [
    (lambda d: d["config"].pop("seed"), ArtefactError, "'seed'"),
    (lambda d: d["config"].pop("hidden_dims"), ArtefactError, "'hidden_dims'"),
    (_config("fuzz_extra", 1), ArtefactError, "fuzz_extra"),
    (_config("hidden_dims", "8"), ArtefactError, "config.hidden_dims"),
    (_config("hidden_dims", [True]), ArtefactError, "config.hidden_dims"),
    (_config("batch_size", [16]), ArtefactError, "config.batch_size"),
    (_config("seed", None), ConfigError, "seed"),
    (_config("lr", 0.5), ConfigError, "lr (0.5 -> 0.01)"),
    (_config("hidden_dims", [1e30]), ConfigError, "hidden_dims"),
    (_config("cache_dir", "../elsewhere"), ConfigError, "cache_dir"),
]


@pytest.mark.parametrize("edit,kind,words", RESUME_CONFIG, ids=[f"config-{i}" for i in range(len(RESUME_CONFIG))])
def test_a_resume_config_error_names_the_trainer_state_file(cache_dir, finished, tmp_path, edit, kind, words):
    out, ckpt = interrupted(finished, tmp_path)
    edit_json(ckpt / "trainer_state.json", edit)
    with pytest.raises(kind) as err:
        resume(cache_dir, out)
    msg = str(err.value)
    assert type(err.value) is kind, msg
    assert str(ckpt / "trainer_state.json") in msg and words in msg and "\n" not in msg, msg
    assert not (out / "model").exists()


def test_check_resume_config_names_its_source():
    from asymvlm.runs import check_resume_config

    with pytest.raises(ConfigError, match=r"cannot resume run: run/round-1/server\.json records another config; "
                                          r"differing keys: recipe \('fedavg' -> 'fedadam'\)"):  # fmt: skip
        check_resume_config({"recipe": "fedavg"}, {"recipe": "fedadam"}, (), Path("run"),
                            source=Path("run/round-1/server.json"))  # fmt: skip
    with pytest.raises(ArtefactError, match=r"^run/server\.json: config is a list, not an object"):
        check_resume_config([1], {"recipe": "fedadam"}, (), Path("run"), source="run/server.json")
    # keys that may change may be absent; null is a value (another one), not another type
    check_resume_config({"recipe": "x"}, {"recipe": "x", "resume": True}, ("resume",), Path("run"))
    with pytest.raises(ConfigError, match="server.json"):
        check_resume_config({"dp_seed": None}, {"dp_seed": 3}, (), Path("run"), source="server.json")


def _skeleton(*path, value=None, pop=False):
    """Set (or remove) skeleton.__dict__.<path...> of optimizer.json."""

    def fn(doc):
        node = doc["skeleton"]["__dict__"]
        for key in path[:-1]:
            node = node[key]
        if pop:
            node.pop(path[-1])
        else:
            node[path[-1]] = value

    return fn


_GROUP0 = ("param_groups", "__list__", 0)
OPTIMIZER_SKELETON = [
    # type holes: an AttributeError inside unflatten_state before
    (_skeleton(*_GROUP0, "__dict__", value=None), "param_groups"),
    (_skeleton(*_GROUP0, "__dict__", value="x"), "param_groups"),
    (_skeleton(*_GROUP0, "__dict__", value=[1]), "param_groups"),
    (_skeleton("state", "__dict__", value=None), "state"),
    (_skeleton("state", "__dict__", value=7), "state"),
    (_skeleton("state", "__dict__", "0", "__dict__", value=None), "state.0"),
    (_skeleton("state", "__dict__", "0", "__dict__", value=True), "state.0"),
    # missing per-parameter state: resumed with Adam's moments restarted (silently) before
    (_skeleton("state", "__dict__", "0", pop=True), "state/0"),
    (_skeleton("state", "__dict__", "3", pop=True), "state/3"),
    (_skeleton("state", "__dict__", value={}), "state/0"),
    (_skeleton("state", "__dict__", pop=True), "state"),
    (_skeleton("state", "__dict__", "0", "__dict__", pop=True), "state"),
    # a missing moment: a KeyError inside torch's adam before
    (_skeleton("state", "__dict__", "0", "__dict__", "exp_avg", pop=True), "state/0/exp_avg"),
    (_skeleton("state", "__dict__", "0", "__dict__", "exp_avg_sq", pop=True), "state/0/exp_avg_sq"),
    (_skeleton("state", "__dict__", "0", "__dict__", "step", pop=True), "state/0/step"),
    (
        _skeleton("state", "__dict__", "0", "__dict__", "max_exp_avg_sq", value={"__tensor__": "state/0/exp_avg_sq"}),
        "max_exp_avg_sq",
    ),  # fmt: skip
    # not a tensor where the skeleton must name one: optimizer.json is to blame (it named optimizer.safetensors)
    (_skeleton("state", "__dict__", "0", "__dict__", "exp_avg", value=None), "state/0/exp_avg"),
    (_skeleton("state", "__dict__", "0", "__dict__", "exp_avg", value="x"), "state/0/exp_avg"),
    (_skeleton("state", "__dict__", "0", "__dict__", "exp_avg", value={}), "exp_avg"),
    (_skeleton("state", "__dict__", "0", "__dict__", "exp_avg", value={"__tensor__": 3}), "exp_avg"),
]


@pytest.mark.parametrize(
    "edit,field", OPTIMIZER_SKELETON, ids=[f"skeleton-{i}" for i in range(len(OPTIMIZER_SKELETON))]
)
def test_a_tampered_optimizer_skeleton_is_one_error_naming_optimizer_json(cache_dir, finished, tmp_path, edit, field):
    out, ckpt = interrupted(finished, tmp_path)
    edit_json(ckpt / "optimizer.json", edit)
    with pytest.raises(ArtefactError) as err:
        resume(cache_dir, out)
    msg = str(err.value)
    assert str(ckpt / "optimizer.json") in msg and field in msg and "\n" not in msg, msg
    assert not (out / "model").exists()
    assert latest_checkpoint(out).name == "checkpoint-00000004"


@pytest.mark.parametrize(
    "name",
    [
        "optimizer.safetensors",
        "trainable.safetensors",
        "trainer_state.json",
        "scheduler.json",
        "rng-0.safetensors",
        "checkpoint-00000004",
    ],  # fmt: skip
)
def test_a_checkpoint_file_linked_outside_its_folder_is_refused(cache_dir, finished, tmp_path, name):
    """Even a link to an identical copy: a checkpoint reads only its own files (a link to another run's
    checkpoint resumed with that run's weights or state before)."""
    out, ckpt = interrupted(finished, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(ckpt, elsewhere)
    entry = ckpt.parent / name if name.startswith("checkpoint-") else ckpt / name
    target = elsewhere if name.startswith("checkpoint-") else elsewhere / name
    (shutil.rmtree if entry.is_dir() else Path.unlink)(entry)
    entry.symlink_to(target)
    with pytest.raises(ArtefactError) as err:
        resume(cache_dir, out)
    msg = str(err.value)
    assert name in msg and "outside" in msg and "\n" not in msg, msg
    assert not (out / "model").exists()


def test_a_checkpoints_folder_linked_elsewhere_still_resumes(cache_dir, finished, tmp_path):
    """The user may keep checkpoints/ on another disk: only links out of a checkpoint folder are refused."""
    out, _ = interrupted(finished, tmp_path)
    moved = tmp_path / "disk2" / "checkpoints"
    moved.parent.mkdir()
    shutil.move(out / "checkpoints", moved)
    (out / "checkpoints").symlink_to(moved)
    model = resume(cache_dir, out)
    got, want = load_file(Path(model) / "head.safetensors"), finished["adamw"][1]
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_stray_link_no_reader_opens_does_not_block_a_resume(cache_dir, finished, tmp_path):
    """Only the files a resume opens are checked (one by one): a link beside them is not read."""
    out, ckpt = interrupted(finished, tmp_path)
    (ckpt / "notes-link").symlink_to("/etc/hostname")
    model = resume(cache_dir, out)
    got, want = load_file(Path(model) / "head.safetensors"), finished["adamw"][1]
    assert all(torch.equal(got[k], want[k]) for k in want)
