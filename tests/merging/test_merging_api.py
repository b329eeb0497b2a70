"""asymvlm.merging.api / asymvlm.merging.lora / asymvlm-merge: every input kind, exact LoRA outputs checked with
peft, the lambda search, YAML recipes and bad input."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from asymvlm.errors import ArtefactError, ConfigError
from asymvlm.heads import TextHead
from asymvlm.merging.api import lambda_search, merge, recall_at_1
from asymvlm.merging.cli import main
from asymvlm.merging.methods import merge_params
from asymvlm.merging.task_vectors import MergeInputError
from asymvlm.model import AsymVLM


# ------------------------------------------------------------------------------------------------
# LoRA adapters, checked against peft itself
# ------------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def base_model():
    torch.manual_seed(0)
    return Tiny()


def make_adapter(path, r, alpha, seed, targets=("fc1", "fc2"), rslora=False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, use_rslora=rslora)
    model = get_peft_model(base_model(), cfg)
    model.save_pretrained(str(path))
    return path


def peft_outputs(adapter_dir, x):
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model(), str(adapter_dir))
    with torch.no_grad():
        return model(x)


def dense_of(adapter_dir):
    """s * B @ A per layer straight from the files (float64)."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    s = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    st = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for name in ("fc1", "fc2"):
        a = st[f"base_model.model.{name}.lora_A.weight"].double()
        b = st[f"base_model.model.{name}.lora_B.weight"].double()
        out[f"{name}.weight"] = s * b @ a
    return out


def outputs_with(deltas, x):
    model = base_model()
    with torch.no_grad():
        for name, d in deltas.items():
            mod = getattr(model, name.split(".")[0])
            mod.weight.add_(d.to(mod.weight.dtype))
        return model(x)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return [
        make_adapter(d / "a1", r=2, alpha=4, seed=1),
        make_adapter(d / "a2", r=3, alpha=6, seed=2, rslora=True),
        make_adapter(d / "a3", r=2, alpha=2, seed=3),
    ]


def test_concat_lora_is_exact_and_loads_in_peft(adapters, tmp_path):
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    weights, lam = [1.0, 0.5, 2.0], 0.7
    rep = merge(None, adapters, tmp_path / "cat", "task_arithmetic", lam=lam, weights=weights, lora_output="concat")
    assert rep["rank"] == 7
    dense = [dense_of(a) for a in adapters]
    expected = {k: lam * sum(w * d[k] for w, d in zip(weights, dense)) for k in dense[0]}
    torch.testing.assert_close(peft_outputs(tmp_path / "cat", x), outputs_with(expected, x), rtol=1e-5, atol=1e-6)
    got = dense_of(tmp_path / "cat")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7)
    # mean = weights normalised to 1
    merge(None, adapters, tmp_path / "mean", "mean", weights=weights, lora_output="concat")
    got = dense_of(tmp_path / "mean")
    for k in expected:
        ref = sum(w * d[k] for w, d in zip(weights, dense)) / sum(weights)
        torch.testing.assert_close(got[k], ref, rtol=1e-6, atol=1e-7)


def test_svd_lora_reports_the_truncation_error(adapters, tmp_path):
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    dense = [dense_of(a) for a in adapters]
    rep = merge(None, adapters, tmp_path / "full", "ties", density=0.5, lora_output="svd", rank=8)
    ties = merge_params({k: torch.zeros_like(v) for k, v in dense[0].items()}, dense, "ties", density=0.5)
    assert rep["truncation_error"]["max"] < 1e-12  # rank 8 >= every layer's rank: exact
    torch.testing.assert_close(peft_outputs(tmp_path / "full", x), outputs_with(ties, x), rtol=1e-5, atol=1e-6)
    rep = merge(None, adapters, tmp_path / "r1", "ties", density=0.5, lora_output="svd", rank=1)
    num = den = 0.0
    for k, d in ties.items():
        sv = np.linalg.svd(d.numpy(), compute_uv=False)
        err = math.sqrt((sv[1:] ** 2).sum() / (sv**2).sum())
        layer = f"base_model.model.{k[:-7]}"
        assert rep["truncation_error"]["per_layer"][layer] == pytest.approx(err, rel=1e-6)  # float32 Delta W
        num, den = num + (sv[1:] ** 2).sum(), den + (sv**2).sum()
        got = dense_of(tmp_path / "r1")[k]
        assert float((got - d).norm() / d.norm()) == pytest.approx(err, rel=1e-6)  # Eckart-Young optimum
    assert rep["truncation_error"]["overall"] == pytest.approx(math.sqrt(num / den), rel=1e-6)
    assert json.loads((tmp_path / "r1" / "merge.json").read_text())["rank"] == 1


def test_dense_lora_output_folds_into_the_base(adapters, tmp_path):
    save_file({k: v.contiguous() for k, v in base_model().state_dict().items()}, tmp_path / "base.safetensors")
    merge(tmp_path / "base.safetensors", adapters, tmp_path / "dense", "task_arithmetic", lam=0.5, lora_output="dense")
    # the same as peft folding the exact concatenated adapter into the weights
    merge(None, adapters, tmp_path / "cat", "task_arithmetic", lam=0.5, lora_output="concat")
    from peft import PeftModel

    folded = PeftModel.from_pretrained(base_model(), str(tmp_path / "cat")).merge_and_unload().state_dict()
    got = load_file(tmp_path / "dense" / "model.safetensors")
    assert got.keys() == folded.keys()
    for k in got:
        torch.testing.assert_close(got[k], folded[k], rtol=1e-5, atol=1e-6)


def test_lora_bad_inputs_write_nothing(adapters, tmp_path):
    with pytest.raises(MergeInputError, match="exact only for linear merges"):
        merge(None, adapters, tmp_path / "o", "ties", lora_output="concat")
    other = make_adapter(tmp_path / "other", r=2, alpha=4, seed=5, targets=("fc1",))
    with pytest.raises(MergeInputError, match="different target modules"):
        merge(None, [adapters[0], other], tmp_path / "o", "task_arithmetic")
    with pytest.raises(MergeInputError, match="pass base="):
        merge(None, adapters, tmp_path / "o", "task_arithmetic", lora_output="dense")
    cfg = json.loads((other / "adapter_config.json").read_text())
    for name, base in (("on-one", "org/base-one"), ("on-two", "org/base-two")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base}))
        (tmp_path / name / "adapter_model.safetensors").write_bytes((other / "adapter_model.safetensors").read_bytes())
    with pytest.raises(MergeInputError, match="different bases"):
        merge(None, [tmp_path / "on-one", tmp_path / "on-two"], tmp_path / "o", "task_arithmetic")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# AsymVLM heads, checkpoints, the CLI
# ------------------------------------------------------------------------------------------------
SOURCE = {"spec": "open_clip:toy", "fingerprint": "f" * 64, "dim": 8}


def save_head(path, head, logit_scale=0.0, source=SOURCE):
    AsymVLM(head, encoder_source=dict(source), logit_scale=logit_scale).save_pretrained(path)
    return path


@pytest.fixture()
def heads(tmp_path):
    torch.manual_seed(0)
    # the paper's head, starting at the embeddings' directions
    base = TextHead(dim=8, hidden_dims=(16,), direction="learned", residual=True)
    save_head(tmp_path / "base", base, 1.0)
    paths = []
    for i in range(3):
        h = TextHead(dim=8, hidden_dims=(16,), direction="learned", residual=True)
        h.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in h.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i)))
        paths.append(save_head(tmp_path / f"ft{i}", h, 1.0 + i))
    return tmp_path / "base", paths


def state(path):
    return load_file(path / "head.safetensors")


def test_cli_merges_asymvlm_heads_like_the_reference(heads, tmp_path, capsys):
    base, fts = heads
    rc = main(["--base", str(base), "--inputs", *map(str, fts), "--method", "ties", "--density", "0.3",
               "--lam", "0.8", "--output_dir", str(tmp_path / "m"), "--no-progress"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "merged 3 asymvlm input(s)" in out and "ties(density=0.3)" in out and "lam=0.8" in out
    b = state(base)
    taus = [{k: state(f)[k] - b[k] for k in b} for f in fts]
    ref = merge_params(b, taus, "ties", density=0.3, lam=0.8)
    got = AsymVLM.from_pretrained(tmp_path / "m", load_encoder=False)
    for k, v in got.head.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-6, atol=1e-7)
    assert got.logit_scale == pytest.approx(2.0)  # mean of the experts' temperatures
    assert got.encoder_source["fingerprint"] == SOURCE["fingerprint"]
    rep = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert rep["method"] == "ties" and rep["options"] == {"density": 0.3} and rep["lam"] == 0.8


def test_yaml_recipe_and_flag_override(heads, tmp_path, capsys):
    base, fts = heads
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"base: {base}\ninputs: [{', '.join(map(str, fts))}]\n"
        f"method: task_arithmetic\nlam: 0.3\noutput_dir: {tmp_path / 'y'}\n"
    )
    assert main(["--config", str(recipe), "--lam", "0.5", "--no-progress"]) == 0
    b = state(base)
    got = state(tmp_path / "y")
    for k in b:
        torch.testing.assert_close(got[k], b[k] + 0.5 * sum(state(f)[k] - b[k] for f in fts), rtol=1e-6, atol=1e-6)
    recipe.write_text(f"base: {base}\ninputs: [{fts[0]}]\ndensty: 0.2\noutput_dir: x\n")
    assert main(["--config", str(recipe)]) == 2
    assert "unknown config key(s) ['densty']" in capsys.readouterr().err


def test_lambda_grid_on_validation_caches(heads, tmp_path, capsys):
    from asymvlm.cache import EmbeddingCache, write_cache

    base, fts = heads
    vals = []
    for i in range(3):
        g = torch.Generator().manual_seed(20 + i)
        img = nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1)
        txt = nn.functional.normalize(img + 0.5 * torch.randn(30, 8, generator=g), dim=-1)
        vals.append(write_cache(tmp_path / f"val{i}", img, txt, torch.arange(30)).path)
    grid = [0.0, 0.5, 1.0, 1.5, 3.0]
    rc = main(["--base", str(base), "--inputs", *map(str, fts), "--method", "task_arithmetic",
               "--lam-grid", ",".join(map(str, grid)), "--val", *map(str, vals), "--output_dir", str(tmp_path / "m"),
               "--no-progress"])  # fmt: skip
    assert rc == 0
    rep = json.loads((tmp_path / "m" / "merge.json").read_text())
    curve = rep["lambda_search"]["curve"]
    assert [c["lam"] for c in curve] == grid
    experts = [AsymVLM.from_pretrained(f, load_encoder=False).head for f in fts]
    caches = [EmbeddingCache.load(v) for v in vals]
    refs = [recall_at_1(h, c.text_embeddings, c.image_embeddings, c.text_image_index) for h, c in zip(experts, caches)]
    assert rep["expert_R@1"] == pytest.approx(refs)
    b = state(base)
    for c in curve:  # each point re-computed independently
        head = TextHead(dim=8, hidden_dims=(16,), direction="learned", residual=True)
        head.load_state_dict({k: b[k] + c["lam"] * sum(state(f)[k] - b[k] for f in fts) for k in b})
        r1 = [recall_at_1(head, x.text_embeddings, x.image_embeddings, x.text_image_index) for x in caches]
        assert c["R@1"] == pytest.approx(r1)
        assert c["score"] == pytest.approx(np.mean([r / ref for r, ref in zip(r1, refs)]))
    assert min(refs) > 0 and len({round(c["score"], 9) for c in curve}) > 1  # a non-trivial curve
    best = max(curve, key=lambda c: c["score"])
    assert rep["lam"] == rep["lambda_search"]["best_lam"] == best["lam"]
    assert "best lam" in capsys.readouterr().out


def test_lambda_search_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(10, generator=g)}
    taus = [{"w": torch.randn(10, generator=g)} for _ in range(3)]
    target = torch.randn(10, generator=g)
    metric = lambda p: -float((p["w"] - target).pow(2).sum())  # noqa: E731
    grid = [x / 10 for x in range(-5, 16)]
    res = lambda_search(base, taus, grid, metric, method="ties", density=0.5)
    brute = [metric(merge_params(base, taus, "ties", density=0.5, lam=lam)) for lam in grid]
    assert [c["score"] for c in res.curve] == pytest.approx(brute)
    assert res.best_lam == grid[int(np.argmax(brute))]


def test_checkpoint_inputs_are_streamed(tmp_path):
    g = torch.Generator().manual_seed(0)
    shapes = {"x.weight": (5, 4), "x.bias": (5,), "y": (3,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    save_file(base, tmp_path / "base.safetensors")
    for i, f in enumerate(fts):
        save_file(f, tmp_path / f"ft{i}.safetensors")
    rep = merge(tmp_path / "base.safetensors", [tmp_path / "ft0.safetensors", tmp_path / "ft1.safetensors"],
                tmp_path / "m", "dare", p=0.5, seed=3)  # fmt: skip
    taus = [{k: f[k] - base[k] for k in base} for f in fts]
    ref = merge_params(base, taus, "dare", p=0.5, seed=3)
    got = load_file(tmp_path / "m" / "model.safetensors")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    assert rep["parameters"] == 28 and json.loads((tmp_path / "m" / "merge.json").read_text())["kind"] == "checkpoint"


def test_bad_inputs_are_clear_errors_and_write_nothing(heads, tmp_path, capsys):
    base, fts = heads
    out = tmp_path / "never"
    cases = [
        (dict(density=0.0), "density must be in"),
        (dict(density=1.5), "density must be in"),
        (dict(weights=[1.0]), "1 weights for 3 inputs"),
        (dict(weights=[1.0, float("nan"), 1.0]), "weights must be finite"),
        (dict(weights=[1.0, float("inf"), 1.0]), "weights must be finite"),
        (dict(lam_grid=[0.5]), "--lam-grid needs --val"),
    ]
    for kw, msg in cases:
        kw = {"method": "ties", **kw}
        with pytest.raises(MergeInputError, match=msg):
            merge(base, fts, out, kw.pop("method"), **kw)
    # unknown methods and options a method does not declare are config errors naming the key
    with pytest.raises(ConfigError, match="unknown merge method 'nope'"):
        merge(base, fts, out, "nope")
    with pytest.raises(
        ConfigError, match=r"unknown option 'density' for merge method 'task_arithmetic'; valid options: lam"
    ):
        merge(base, fts, out, "task_arithmetic", density=0.2)
    with pytest.raises(ConfigError, match="scope='nowhere' is not one of"):
        merge(base, fts, out, "ties", scope="nowhere")
    with pytest.raises(MergeInputError, match="needs --base"):
        merge(None, fts, out, "ties")
    save_file({"w": torch.zeros(2)}, tmp_path / "ck.safetensors")
    with pytest.raises(MergeInputError, match="inputs of different kinds"):
        merge(base, [fts[0], tmp_path / "ck.safetensors"], out, "ties")
    head = TextHead(dim=8, hidden_dims=(16,), direction="learned", residual=True)
    other = save_head(tmp_path / "other", head, source={**SOURCE, "fingerprint": "0" * 64})
    with pytest.raises(MergeInputError, match="another encoder"):
        merge(base, [fts[0], other], out, "ties")
    bad = tmp_path / "nan"
    save_head(bad, AsymVLM.from_pretrained(fts[0], load_encoder=False).head)
    st = state(bad)
    st["mlp.0.weight"][0, 0] = float("nan")
    save_file(st, bad / "head.safetensors")
    # the load refuses it (ArtefactError) or the merge does (MergeInputError), naming the file and key
    with pytest.raises((MergeInputError, ArtefactError), match=r"nan/head\.safetensors.*'mlp\.0\.weight'.*NaN or inf"):
        merge(base, [fts[0], bad], out, "task_arithmetic")
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "asymvlm_config.json").write_text((fts[0] / "asymvlm_config.json").read_text())
    (tmp_path / "trunc" / "head.safetensors").write_bytes((fts[0] / "head.safetensors").read_bytes()[:100])
    with pytest.raises(Exception, match="corrupt|truncated"):
        merge(base, [fts[0], tmp_path / "trunc"], out, "task_arithmetic")
    with pytest.raises(MergeInputError, match="missing input"):
        merge(base, [tmp_path / "nowhere"], out, "ties")
    assert not out.exists()
    assert main(["--base", str(base), "--inputs", str(fts[0]), "--density", "2", "--output_dir", str(out)]) == 2
    assert "density must be in (0, 1]" in capsys.readouterr().err
    assert main(["--inputs", str(fts[0])]) == 2
    assert not out.exists()


def test_lambda_search_never_picks_an_undefined_score():
    base, taus = {"w": torch.zeros(2)}, [{"w": torch.ones(2)}]
    res = lambda_search(base, taus, [0.0, 1.0, 2.0], lambda p: float("nan") if p["w"][0] == 1 else -float(p["w"][0]))
    assert res.best_lam == 0.0 and math.isnan(res.curve[1]["score"])
    with pytest.raises(ValueError, match="not finite for any lambda"):
        lambda_search(base, taus, [1.0], lambda p: float("nan"))
