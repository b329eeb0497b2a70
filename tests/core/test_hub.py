"""Sharing on the Hugging Face Hub (asymvlm/hub.py): saved artefacts load from a Hub id as from a
folder, offline from a Hub cache the test lays out as huggingface_hub writes it
(models--owner--name/{refs,snapshots}); every save writes a model card that huggingface_hub reads
back; push_to_hub uploads what would load (HfApi recorded, nothing sent)."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData

from asymvlm.cache import write_cache
from asymvlm.errors import ArtefactError, MergeInputError
from asymvlm.heads import TextHead
from asymvlm.hub import (
    CARD_MARK,
    DEFAULT_LICENSE,
    card_from_folder,
    is_asymvlm_card,
    looks_like_hub_id,
    model_card,
    push_to_hub,
    resolve_artefact,
)
from asymvlm.io import tensor_fingerprint
from asymvlm.merging.api import merge
from asymvlm.model import AsymVLM


def hub_cache(tmp_path, repo: str, folder, revisions: dict[str, str]):
    """A Hub cache holding ``folder`` as ``repo`` at each ``{ref: commit}``."""
    root = tmp_path / "hub"
    base = root / f"models--{repo.replace('/', '--')}"
    for ref, commit in revisions.items():
        shutil.copytree(folder, base / "snapshots" / commit, dirs_exist_ok=True)
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / ref).write_text(commit)
    return root


def test_from_pretrained_takes_a_hub_id_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest: no network in tests
    torch.manual_seed(0)
    model = AsymVLM(TextHead(dim=16, family="vmf", hidden_dims=(8,)), logit_scale=2.0)
    saved = model.save_pretrained(tmp_path / "local")
    v2 = AsymVLM(TextHead(dim=16, family="vmf", hidden_dims=(8,)), logit_scale=3.0).save_pretrained(tmp_path / "v2")
    cache = hub_cache(tmp_path, "alice/asymvlm-shapes", saved, {"main": "a" * 40})
    hub_cache(tmp_path, "alice/asymvlm-shapes", v2, {"v2": "b" * 40})
    x = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    local = AsymVLM.from_pretrained(saved, load_encoder=False)
    hub = AsymVLM.from_pretrained("alice/asymvlm-shapes", load_encoder=False, cache_dir=str(cache))
    q_local, q_hub = local.head(x), hub.head(x)
    assert torch.equal(q_local.loc, q_hub.loc) and torch.equal(q_local.log_prob(x), q_hub.log_prob(x))
    assert hub.logit_scale == 2.0
    tagged = AsymVLM.from_pretrained("alice/asymvlm-shapes", revision="v2", load_encoder=False, cache_dir=str(cache))
    assert tagged.logit_scale == 3.0  # the revision's snapshot
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # HF_HUB_CACHE, as users set it
    assert AsymVLM.from_pretrained("alice/asymvlm-shapes", load_encoder=False).logit_scale == 2.0


def test_what_is_neither_a_folder_nor_a_cached_hub_model_is_one_clear_error(tmp_path):
    with pytest.raises(ArtefactError, match=r"no saved AsymVLM at .*not in the local Hub cache.*HF_HUB_OFFLINE"):
        AsymVLM.from_pretrained("alice/not-there", load_encoder=False, cache_dir=str(tmp_path))
    with pytest.raises(ArtefactError, match="no saved AsymVLM at runs/vmf/model$"):
        AsymVLM.from_pretrained("runs/vmf/model", load_encoder=False)  # two slashes: a path, not an id
    with pytest.raises(ArtefactError, match="revision='v1' is for Hub ids"):
        resolve_artefact(tmp_path, revision="v1")
    assert looks_like_hub_id("alice/asymvlm-shapes") and looks_like_hub_id("org.x/model_v1.2")
    for bad in ("alice", "a/b/c", "../x", "alice/..", "/abs/path", "alice/x-"):
        assert not looks_like_hub_id(bad), bad


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def front_matter(path) -> dict:
    """The YAML front matter of a README.md, parsed by PyYAML (what the Hub reads)."""
    text = Path(path).read_text()
    assert text.startswith("---\n"), text[:80]
    return yaml.safe_load(text.split("---\n", 2)[1])


def card_record(path) -> dict:
    return front_matter(path)["asymvlm"]


def hub_round_trip(path):
    """huggingface_hub's own reading of the card: ModelCard.load, and ModelCardData rebuilt from it."""
    card = ModelCard.load(path)
    again = ModelCardData(**card.data.to_dict())
    assert again.to_dict() == card.data.to_dict() == front_matter(path)
    return card


def use_hub_cache(monkeypatch, root):
    """Point huggingface_hub at ``root`` (as HF_HUB_CACHE does) for calls that take no cache_dir."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))


def expert_heads(tmp_path, n=2, dim=8):
    """A saved base head and ``n`` experts fine-tuned from it (perturbed copies recording their lineage)."""
    torch.manual_seed(0)
    source = {"spec": "hf:openai/clip-vit-base-patch32", "pretrained": None, "fingerprint": "f" * 64, "dim": dim}
    base = TextHead(dim=dim, hidden_dims=(16,), direction="learned", residual=True)
    AsymVLM(base, encoder_source=source, logit_scale=1.0).save_pretrained(tmp_path / "base")
    lineage = {"init_from": "alice/base", "init_from_fingerprint": tensor_fingerprint(base.state_dict())}
    paths = []
    for i in range(n):
        h = TextHead(dim=dim, hidden_dims=(16,), direction="learned", residual=True)
        h.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in h.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(10 + i)))
        m = AsymVLM(h, encoder_source=source, logit_scale=1.0 + i, lineage=lineage)
        paths.append(m.save_pretrained(tmp_path / f"expert{i}"))
    return tmp_path / "base", paths


def small_cache(path, n_images=64, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    idx = torch.arange(n_images).repeat_interleave(2)
    txt = torch.nn.functional.normalize(img[idx] + 0.3 * torch.randn(2 * n_images, dim, generator=g), dim=-1)
    write_cache(path, img, txt, idx, captions=[f"caption {i}" for i in range(2 * n_images)])
    return path


def make_adapter(path, seed):
    """A peft LoRA adapter of a tiny MLP (what merges of LoRA inputs read)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    torch.manual_seed(seed)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(str(path))
    cfg_path = path / "adapter_config.json"
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json["base_model_name_or_path"] = "org/tiny-mlp"  # a Hub base, as peft writes for transformers models
    cfg_path.write_text(json.dumps(cfg_json))
    return path


def train_config(cache, out, **kw):
    from asymvlm.training.config import TrainConfig

    base = dict(cache_dir=str(cache), hidden_dims=[8], max_steps=6, batch_size=32, save_every=0, output_dir=str(out),
                progress=False, log_with="none", optimizer="adamw", lr=1e-2, log_every=1, eval_every=3,
                eval_fraction=0.25)  # fmt: skip
    return TrainConfig.from_dict({**base, **kw})


# ------------------------------------------------------------------------------------------------
# the card itself
# ------------------------------------------------------------------------------------------------
def test_card_yaml_parses_with_the_hubs_fields_and_round_trips_through_huggingface_hub(tmp_path):
    torch.manual_seed(0)
    source = {"spec": "open_clip:hf-hub:timm/ViT-B-16-SigLIP", "pretrained": None, "fingerprint": "a" * 64, "dim": 8}
    lineage = {"init_from": "/home/alice/runs/base/model", "init_from_fingerprint": "b" * 64}
    model = AsymVLM(TextHead(dim=8, family="ps", hidden_dims=(4,)), encoder_source=source, logit_scale=2.5,
                    lineage=lineage)  # fmt: skip
    info = {
        "data": {"dataset": "nlphuji/flickr30k", "num_images": 31014, "num_texts": 155070},
        "recipe": {"lr": 1e-3, "hidden_dims": (4,), "max_logit_scale": float("inf")},
        "metrics": {"loss": 2.5, "kappa_median": 12.0, "diverged": float("nan")},
        "evaluation": {"dataset": "flickr30k", "split": "test", "metrics": {"t2i_R@1": 0.41, "error_auroc": 0.7}},
        "license": "mit",
    }
    path = model.save_pretrained(tmp_path / "m", card=info) / "README.md"
    meta = front_matter(path)
    assert meta["library_name"] == "asymvlm" and meta["license"] == "mit"
    assert meta["tags"] == ["asymvlm", "vision-language", "uncertainty", "power-spherical"]
    assert meta["base_model"] == "timm/ViT-B-16-SigLIP" and meta["datasets"] == ["nlphuji/flickr30k"]
    saved = json.loads((tmp_path / "m" / "asymvlm_config.json").read_text())  # the reference: what loading reads
    rec = meta["asymvlm"]
    assert rec["kind"] == "model" and rec["encoder"] == saved["encoder"] and rec["head"] == saved["head"]
    assert rec["logit_scale"] == saved["logit_scale"] == 2.5
    assert rec["lineage"] == {"init_from": "base/model", "init_from_fingerprint": "b" * 64}  # no local path published
    assert rec["data"] == info["data"] and rec["recipe"] == {"lr": 1e-3, "hidden_dims": [4], "max_logit_scale": None}
    assert rec["metrics"] == {"loss": 2.5, "kappa_median": 12.0, "diverged": None}  # strict YAML: no NaN
    (index,) = meta["model-index"]
    (result,) = index["results"]
    assert result["dataset"] == {"name": "flickr30k", "type": "flickr30k", "split": "test"}
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"t2i_R@1": 0.41, "error_auroc": 0.7}
    card = hub_round_trip(path)
    results = [(e.metric_type, e.metric_value) for e in card.data.eval_results]
    assert results == [("t2i_R@1", 0.41), ("error_auroc", 0.7)]
    assert is_asymvlm_card(path) and card.text.lstrip().startswith(CARD_MARK)
    body = card.text
    assert 'AsymVLM.from_pretrained("<user>/<repo>")' in body and "Power Spherical" in body
    assert "| loss | 2.5 |" in body and "| t2i_R@1 | 0.41 |" in body and "| num_images | 31014 |" in body
    loaded = AsymVLM.from_pretrained(tmp_path / "m", load_encoder=False)  # the card changes nothing of loading
    assert torch.equal(loaded.head.mlp[0].weight, model.head.mlp[0].weight)
    # a card rendered again from its own record (what a push does) is the same card, the repo id named
    again = card_from_folder(tmp_path / "m", repo_id="alice/ps-heads")
    assert again.data.to_dict() | {"model-index": None} == card.data.to_dict() | {"model-index": None}
    assert 'AsymVLM.from_pretrained("alice/ps-heads")' in again.text and "# ps-heads" in again.text
    # a model without a Hub encoder has no base_model and loads without one; vMF tags vmf
    plain = AsymVLM(TextHead(dim=8, hidden_dims=(4,))).save_pretrained(tmp_path / "plain") / "README.md"
    meta = front_matter(plain)
    assert "base_model" not in meta and "model-index" not in meta and meta["license"] == DEFAULT_LICENSE
    assert meta["tags"][-1] == "vmf" and 'from_pretrained("<user>/<repo>", load_encoder=False)' in plain.read_text()
    hub_round_trip(plain)
    with pytest.raises(ValueError, match="unknown model card kind 'nope'"):
        model_card("nope")


def test_a_users_readme_is_never_overwritten(tmp_path, heads=None):
    model = AsymVLM(TextHead(dim=8, hidden_dims=(4,)))
    out = model.save_pretrained(tmp_path / "m", card={"metrics": {"loss": 1.0}})
    assert card_record(out / "README.md")["metrics"] == {"loss": 1.0}
    model.save_pretrained(out, card={"metrics": {"loss": 0.5}})  # asymvlm's own card: replaced
    assert card_record(out / "README.md")["metrics"] == {"loss": 0.5}
    mine = "---\nlicense: mit\n---\n# My model\n\nyears of work\n"
    (out / "README.md").write_text(mine)
    with pytest.warns(UserWarning, match="not a model card asymvlm wrote"):
        model.save_pretrained(out)
    assert (out / "README.md").read_text() == mine
    (out / "README.md").write_text("---\n: not yaml [\n---\n")  # even a broken card never breaks loading
    AsymVLM.from_pretrained(out, load_encoder=False)

    # merge outputs (atomic_directory): a card the user took over, and a README asymvlm never wrote
    base, experts = expert_heads(tmp_path / "heads")
    merged = tmp_path / "merged"
    merge(base, experts, merged, "task_arithmetic", lam=0.5)
    assert card_record(merged / "README.md")["kind"] == "merged"
    (merged / "README.md").write_text(mine)  # the user edits asymvlm's card (its mark is gone)
    with pytest.warns(UserWarning, match="not a model card asymvlm wrote"):
        merge(base, experts, merged, "task_arithmetic", lam=0.7)
    assert (merged / "README.md").read_text() == mine and json.loads((merged / "merge.json").read_text())["lam"] == 0.7
    manifest = merged / ".asymvlm-files.json"  # a folder written before cards existed: README.md is not ours
    manifest.write_text(json.dumps({"entries": [e for e in json.loads(manifest.read_text())["entries"]
                                                if e != "README.md"]}))  # fmt: skip
    with pytest.warns(UserWarning, match="not a model card asymvlm wrote"):
        merge(base, experts, merged, "task_arithmetic", lam=0.9)
    assert (merged / "README.md").read_text() == mine and json.loads((merged / "merge.json").read_text())["lam"] == 0.9
    (merged / "README.md").unlink()  # gone: the next merge writes its card again
    merge(base, experts, merged, "task_arithmetic", lam=1.0)
    assert card_record(merged / "README.md")["recipe"]["lam"] == 1.0


# ------------------------------------------------------------------------------------------------
# every save site writes one
# ------------------------------------------------------------------------------------------------
def test_a_training_run_saves_its_data_recipe_and_measured_metrics_in_the_card(tmp_path):
    from asymvlm.training.loop import train

    cache = small_cache(tmp_path / "cache")
    model_dir = train(train_config(cache, tmp_path / "run"))
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    rec = card_record(model_dir / "README.md")
    assert rec["kind"] == "model" and rec["head"]["hidden_dims"] == [8]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert rec["data"] == {"cache": "cache", "dataset_fingerprint": manifest["dataset_fingerprint"], "num_images": 64,
                           "num_texts": 128, "train_images": 48, "train_texts": 96}  # fmt: skip
    assert rec["recipe"]["lr"] == 1e-2 and rec["recipe"]["max_steps"] == 6 and "output_dir" not in rec["recipe"]
    assert rec["metrics"]["loss"] == log[-1]["loss"] and rec["metrics"]["step"] == 6
    assert rec["metrics"]["kappa_median"] == log[-1]["kappa_median"]
    evaluated = {k[5:]: v for k, v in log[-1].items() if k.startswith("eval/")}
    assert evaluated and rec["evaluation"]["metrics"] == evaluated
    card = hub_round_trip(model_dir / "README.md")
    assert {e.metric_type: e.metric_value for e in card.data.eval_results} == evaluated
    assert f"| loss | {log[-1]['loss']:.6g} |" in card.text


def test_federated_exports_carry_the_recipe_rounds_clients_and_dp_epsilon(tmp_path):
    from asymvlm.config import DataArguments
    from asymvlm.federated.config import FederatedArguments
    from asymvlm.heads import HeadConfig
    from asymvlm.training.federate import federate

    cache = small_cache(tmp_path / "cache", n_images=90)
    fed = FederatedArguments(rounds=2, num_clients=3, local_steps=2, local_batch_size=16, progress=False,
                             output_dir=str(tmp_path / "f"), local_lr=0.2, dp_noise_multiplier=1.1, dp_max_norm=0.5,
                             dp_delta=1e-5, client_fraction=0.7, dp_insecure_seed=3)  # fmt: skip
    state, _, path = federate(DataArguments(cache_dir=str(cache)), HeadConfig(hidden_dims=[8]), fed, {})
    rec = card_record(path / "README.md")
    assert rec["kind"] == "federated" and "federated-learning" in front_matter(path / "README.md")["tags"]
    assert rec["recipe"]["recipe"] == fed.recipe and rec["recipe"]["rounds"] == state.round == 2
    assert rec["recipe"]["num_clients"] == 3 and rec["data"]["clients"] == 3 and sum(rec["data"]["client_images"]) == 90
    assert state.epsilon > 0 and rec["recipe"]["dp_epsilon"] == rec["metrics"]["dp_epsilon"] == state.epsilon
    assert rec["data"]["num_images"] == 90 and rec["data"]["cache"] == "cache"
    hub_round_trip(path / "README.md")
    plain = FederatedArguments(rounds=2, num_clients=3, local_steps=2, local_batch_size=16,
                               output_dir=str(tmp_path / "g"), progress=False, local_lr=0.2)  # fmt: skip
    _, _, path = federate(DataArguments(cache_dir=str(cache)), HeadConfig(hidden_dims=[8]), plain, {})
    last = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()][-1]
    rec = card_record(path / "README.md")
    assert "dp_epsilon" not in rec["recipe"] and rec["metrics"]["loss_after"] == last["loss_after"]
    assert rec["metrics"]["fairness"] == last["fairness"] and rec["metrics"]["round"] == 2


def test_the_flower_serverapps_final_model_has_its_card(tmp_path):
    pytest.importorskip("flwr")
    from asymvlm.federated import flower as F
    from asymvlm.testing import LocalGrid

    cache = small_cache(tmp_path / "cache", n_images=60)
    rc = dict(cache_dir=str(cache), rounds=2, num_clients=2, eval_every=1, output_dir=str(tmp_path / "fl"),
              hidden_dims="[8]", local_steps=2, local_batch_size=16, progress=False, local_lr=0.2)  # fmt: skip
    state = F.run_flower_server(LocalGrid(F.client_app, rc, [{"partition-id": i} for i in range(2)]), rc)
    rec = card_record(tmp_path / "fl" / "model" / "README.md")
    last = [json.loads(line) for line in (tmp_path / "fl" / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["kind"] == "federated" and rec["recipe"]["rounds"] == state.round == 2
    assert rec["data"]["clients"] == 2 and rec["metrics"]["fairness"] == last["fairness"]
    hub_round_trip(tmp_path / "fl" / "model" / "README.md")


def test_every_merge_output_kind_has_its_card(tmp_path):
    from safetensors.torch import load_file, save_file

    from asymvlm.merging.task_vectors import task_vector_from_checkpoints, task_vector_from_lora

    # AsymVLM heads, lambda picked by the search on validation caches: its scores are the card's metrics
    base, experts = expert_heads(tmp_path)
    val = [small_cache(tmp_path / f"val{i}", n_images=20, dim=8, seed=i) for i in range(2)]
    rep = merge(
        base, experts, tmp_path / "heads", "ties", density=0.5, lam_grid=[0.5, 1.0], val=val, select_by="likelihood"
    )
    rec = card_record(tmp_path / "heads" / "README.md")
    assert rec["kind"] == "merged" and rec["recipe"]["method"] == "ties"
    assert rec["recipe"]["options"] == {"density": 0.5}
    assert rec["recipe"]["lam"] == rep["lam"] == rep["lambda_search"]["best_lam"]
    fps = [tensor_fingerprint(load_file(p / "head.safetensors")) for p in experts]
    assert [e["fingerprint"] for e in rec["recipe"]["experts"]] == fps
    assert rec["recipe"]["base"]["fingerprint"] == tensor_fingerprint(load_file(base / "head.safetensors"))
    assert rec["metrics"]["best_score"] == rep["lambda_search"]["best_score"]
    best = next(e for e in rep["lambda_search"]["curve"] if e["lam"] == rep["lam"])
    card = hub_round_trip(tmp_path / "heads" / "README.md")
    assert {e.metric_type: e.metric_value for e in card.data.eval_results}["mean_R@1"] == best["mean_R@1"]
    assert card.data.base_model == "openai/clip-vit-base-patch32" and "merge" in card.data.tags
    # checkpoints and task vectors (streamed into model.safetensors)
    g = torch.Generator().manual_seed(0)
    ckpt = {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g)}
    save_file(ckpt, tmp_path / "base.safetensors")
    for i in range(2):
        save_file({k: v + 0.1 * (i + 1) for k, v in ckpt.items()}, tmp_path / f"ft{i}.safetensors")
    fts = [tmp_path / f"ft{i}.safetensors" for i in range(2)]
    merge(tmp_path / "base.safetensors", fts, tmp_path / "ckpt", "task_arithmetic", lam=0.5)
    assert card_record(tmp_path / "ckpt" / "README.md")["kind"] == "checkpoint"
    ckpt_base = tmp_path / "base.safetensors"
    tvs = [task_vector_from_checkpoints(ckpt_base, f, tmp_path / f"t{i}") for i, f in enumerate(fts)]
    tv_rec = card_record(tvs[0] / "README.md")
    side = json.loads((tvs[0] / "task_vector.json").read_text())
    assert tv_rec["kind"] == "task_vector" and tv_rec["recipe"]["base_fingerprint"] == side["base_fingerprint"]
    assert tv_rec["recipe"]["parameters"] == 16 and tv_rec["recipe"]["keys"] == 2
    merge(tmp_path / "base.safetensors", tvs, tmp_path / "tv-merged", "ties", density=1.0)
    rec = card_record(tmp_path / "tv-merged" / "README.md")
    assert [e["base_fingerprint"] for e in rec["recipe"]["experts"]] == [side["base_fingerprint"]] * 2
    # LoRA adapters: an exact concatenated adapter, an SVD one, and the dense update folded into a base
    adapters = [make_adapter(tmp_path / f"ad{i}", seed=i + 1) for i in range(2)]
    merge(None, adapters, tmp_path / "cat", "task_arithmetic", lora_output="concat")
    merge(None, adapters, tmp_path / "svd", "ties", density=0.5, lora_output="svd", rank=1)
    dense_base = {f"{m}.weight": torch.randn(s, generator=g) for m, s in (("0", (8, 6)), ("2", (4, 8)))}
    save_file(dense_base, tmp_path / "mlp.safetensors")
    merge(tmp_path / "mlp.safetensors", adapters, tmp_path / "dense", "task_arithmetic", lora_output="dense")
    for name, kind in (("cat", "lora"), ("svd", "lora"), ("dense", "checkpoint")):
        card = hub_round_trip(tmp_path / name / "README.md")
        assert card.data.asymvlm["kind"] == kind and card.data.base_model == "org/tiny-mlp", name
    svd = card_record(tmp_path / "svd" / "README.md")
    report = json.loads((tmp_path / "svd" / "merge.json").read_text())
    assert svd["metrics"]["truncation_error"]["overall"] == report["truncation_error"]["overall"]
    lora_tv = task_vector_from_lora(adapters[0], tmp_path / "lora-tv")
    assert card_record(lora_tv / "README.md")["recipe"]["source"] == "lora"


# ------------------------------------------------------------------------------------------------
# push_to_hub (HfApi recorded, nothing sent)
# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def hub_calls(monkeypatch, tmp_path):
    """HfApi's create_repo / create_branch / create_commit replaced by recorders; create_commit
    keeps a copy of what would be uploaded (each operation's bytes or file)."""
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kw):
        calls.append(("create_branch", repo_id, kw))

    def create_commit(self, repo_id, operations, **kw):
        copy = tmp_path / "uploaded" / str(len(calls))
        sources = []
        for op in operations:
            target = copy / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(op.path_or_fileobj, bytes):
                target.write_bytes(op.path_or_fileobj)
            else:
                sources.append(Path(op.path_or_fileobj))
                shutil.copy(op.path_or_fileobj, target)
        files = sorted(op.path_in_repo for op in operations)
        calls.append(("create_commit", repo_id, {**kw, "files": files, "copy": copy, "sources": sources}))
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_model_push_to_hub_uploads_a_saved_model_with_its_card(hub_calls):
    torch.manual_seed(0)
    model = AsymVLM(TextHead(dim=8, hidden_dims=(4,)), logit_scale=1.5)
    assert model.push_to_hub("alice/heads", private=True, token="t", revision="v1", create_pr=True) == "commit-info"
    (_, repo, create), (_, _, branch), (_, _, upload) = hub_calls
    assert repo == "alice/heads" and create["private"] is True and create["exist_ok"] is True
    assert branch["branch"] == "v1" and branch["exist_ok"] is True
    assert repo == "alice/heads" and upload["revision"] == "v1" and upload["create_pr"] is True
    assert upload["token"] == "t" and upload["commit_message"] == "Upload AsymVLM"
    assert upload["files"] == ["README.md", "asymvlm_config.json", "head.safetensors"]
    assert upload["sources"] and not any(p.exists() for p in upload["sources"])  # the temporary folder is gone
    uploaded = AsymVLM.from_pretrained(upload["copy"], load_encoder=False)  # what the Hub would serve loads
    x = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    assert torch.equal(uploaded.uncertainty(x), model.uncertainty(x)) and uploaded.logit_scale == 1.5
    card = hub_round_trip(upload["copy"] / "README.md")
    assert 'AsymVLM.from_pretrained("alice/heads", load_encoder=False)' in card.text


def test_push_to_hub_uploads_only_what_asymvlm_wrote_and_no_link_out(tmp_path, hub_calls):
    """Issue 26: a user's own files kept in a model folder stay private, and a link out of the
    folder (it would upload another file of the machine) is refused before anything is sent."""
    from asymvlm.io import atomic_directory

    torch.manual_seed(0)
    model = AsymVLM(TextHead(dim=8, hidden_dims=(4,)), logit_scale=1.5)
    folder = tmp_path / "model"
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp)
    (folder / "my-private-eval.txt").write_text("not for the Hub")
    match = r"not uploaded, as asymvlm did not write them there: \['my-private-eval.txt'\]"
    with pytest.warns(UserWarning, match=match):
        push_to_hub(folder, "alice/heads")
    assert hub_calls[-1][2]["files"] == ["README.md", "asymvlm_config.json", "head.safetensors"]
    n = len(hub_calls)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (folder / "head.safetensors").unlink()
    (folder / "head.safetensors").symlink_to(secret)
    with pytest.raises(ArtefactError, match="head.safetensors.*resolves outside"):
        push_to_hub(folder, "alice/heads")
    assert len(hub_calls) == n  # nothing was sent


def test_push_to_hub_takes_any_saved_artefact_folder_and_refuses_the_rest(tmp_path, hub_calls):
    base, experts = expert_heads(tmp_path)
    merge(base, experts, tmp_path / "merged", "task_arithmetic", lam=0.5)
    saved_card = (tmp_path / "merged" / "README.md").read_bytes()
    push_to_hub(tmp_path / "merged", "alice/merged", commit_message="a merge")
    (_, _, create), (_, _, upload) = hub_calls
    assert create == {"private": None, "exist_ok": True, "repo_type": "model", "token": None}
    assert upload["files"] == ["README.md", "asymvlm_config.json", "head.safetensors", "merge.json"]  # no bookkeeping
    assert upload["commit_message"] == "a merge" and upload["revision"] is None and upload["create_pr"] is False
    card = hub_round_trip(upload["copy"] / "README.md")
    assert 'AsymVLM.from_pretrained("alice/merged")' in card.text and card.data.asymvlm["recipe"]["lam"] == 0.5
    assert card_record(tmp_path / "merged" / "README.md") == card.data.asymvlm
    assert (tmp_path / "merged" / "README.md").read_bytes() == saved_card  # the folder is not changed
    from asymvlm.merging.task_vectors import task_vector_from_models

    tv = task_vector_from_models(base, experts[0], tmp_path / "tv")
    push_to_hub(tv, "alice/tv")
    assert hub_calls[-1][2]["files"] == ["README.md", "task_vector.json", "task_vector.safetensors"]
    assert hub_calls[-1][2]["commit_message"] == "Upload asymvlm task vector"
    n = len(hub_calls)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("years of work")
    with pytest.raises(ArtefactError, match=r"notes is not an asymvlm artefact .*: nothing pushed$"):
        push_to_hub(tmp_path / "notes", "alice/notes")
    (tmp_path / "run" / "model").mkdir(parents=True)
    shutil.copytree(experts[0], tmp_path / "run" / "model", dirs_exist_ok=True)
    with pytest.raises(ArtefactError, match=r"it is a run folder: push its model, .*run/model"):
        push_to_hub(tmp_path / "run", "alice/run")
    with pytest.raises(ArtefactError, match="'not a repo' is not a Hub model id"):
        push_to_hub(experts[0], "not a repo")
    with pytest.raises(ArtefactError, match="no folder at"):
        push_to_hub(tmp_path / "nowhere", "alice/x")
    assert len(hub_calls) == n  # nothing was sent for any of them
    (experts[1] / "README.md").write_text("# my own card\n")  # a user's README is uploaded as it is
    push_to_hub(experts[1], "alice/e1")
    assert (hub_calls[-1][2]["copy"] / "README.md").read_text() == "# my own card\n"


# ------------------------------------------------------------------------------------------------
# every reader takes a Hub id (offline, from a Hub cache)
# ------------------------------------------------------------------------------------------------
def test_merges_read_heads_task_vectors_checkpoints_and_adapters_by_hub_id(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from asymvlm.merging.cli import main
    from asymvlm.merging.task_vectors import task_vector_from_models

    base, experts = expert_heads(tmp_path)
    hub = hub_cache(tmp_path, "alice/base", base, {"main": "0" * 40})
    hub_cache(tmp_path, "alice/expert-a", experts[0], {"main": "1" * 40})
    hub_cache(tmp_path, "alice/expert-b", experts[1], {"v2": "2" * 40})  # only at a tag
    use_hub_cache(monkeypatch, hub)
    ids = ["alice/expert-a", "alice/expert-b@v2"]
    local = merge(base, experts, tmp_path / "local", "ties", density=0.5, lam=0.8)
    remote = merge("alice/base", ids, tmp_path / "remote", "ties", density=0.5, lam=0.8)
    a, b = load_file(tmp_path / "local" / "head.safetensors"), load_file(tmp_path / "remote" / "head.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert remote["inputs"] == ids and remote["base"] == "alice/base" and local["inputs"] == [str(p) for p in experts]
    assert [e["name"] for e in card_record(tmp_path / "remote" / "README.md")["recipe"]["experts"]] == ids
    assert main(["--base", "alice/base", "--inputs", *ids, "--method", "ties", "--density", "0.5", "--lam", "0.8",
                 "--output_dir", str(tmp_path / "cli"), "--no_progress"]) == 0  # fmt: skip
    c = load_file(tmp_path / "cli" / "head.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
    # the merged output shared on the Hub loads by its id
    hub_cache(tmp_path, "alice/merged", tmp_path / "remote", {"main": "3" * 40})
    shared = AsymVLM.from_pretrained("alice/merged", load_encoder=False)
    assert all(torch.equal(v, b[k]) for k, v in shared.head.state_dict().items())
    # task vectors by id (from models by id, too), merged onto a checkpoint
    tv_local = task_vector_from_models(base, experts[0], tmp_path / "tv-local")
    tv_hub = task_vector_from_models("alice/base", "alice/expert-a", tmp_path / "tv-hub")
    x, y = load_file(tv_local / "task_vector.safetensors"), load_file(tv_hub / "task_vector.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)
    task_vector_from_models(base, experts[1], tmp_path / "tv-b")
    hub_cache(tmp_path, "alice/tv-a", tv_hub, {"main": "4" * 40})
    hub_cache(tmp_path, "alice/tv-b", tmp_path / "tv-b", {"main": "5" * 40})
    merge(base / "head.safetensors", [tv_local, tmp_path / "tv-b"], tmp_path / "tvl", "task_arithmetic", lam=0.5)
    merge(base / "head.safetensors", ["alice/tv-a", "alice/tv-b"], tmp_path / "tvh", "task_arithmetic", lam=0.5)
    x, y = load_file(tmp_path / "tvl" / "model.safetensors"), load_file(tmp_path / "tvh" / "model.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)
    # a merged checkpoint shared on the Hub (a folder with model.safetensors) is a checkpoint input
    hub_cache(tmp_path, "alice/ckpt", tmp_path / "tvl", {"main": "6" * 40})
    ft = tmp_path / "ft.safetensors"
    save_file({k: v + 1 for k, v in load_file(base / "head.safetensors").items()}, ft)
    merge(base / "head.safetensors", [tmp_path / "tvl" / "model.safetensors", ft], tmp_path / "cl", "task_arithmetic")
    merge(base / "head.safetensors", ["alice/ckpt", ft], tmp_path / "ch", "task_arithmetic")
    x, y = load_file(tmp_path / "cl" / "model.safetensors"), load_file(tmp_path / "ch" / "model.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)
    # peft adapters by id
    adapters = [make_adapter(tmp_path / f"ad{i}", seed=i + 1) for i in range(2)]
    hub_cache(tmp_path, "alice/ad0", adapters[0], {"main": "7" * 40})
    hub_cache(tmp_path, "alice/ad1", adapters[1], {"main": "8" * 40})
    merge(None, adapters, tmp_path / "lora-l", "task_arithmetic", lora_output="concat")
    merge(None, ["alice/ad0", "alice/ad1"], tmp_path / "lora-h", "task_arithmetic", lora_output="concat")
    x = load_file(tmp_path / "lora-l" / "adapter_model.safetensors")
    y = load_file(tmp_path / "lora-h" / "adapter_model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(MergeInputError, match="not in the local Hub cache"):
        merge("alice/base", ["alice/not-there"], tmp_path / "o", "ties")
    assert not (tmp_path / "o").exists()


def test_training_and_federated_init_from_and_exports_by_hub_id(tmp_path, monkeypatch):
    from asymvlm.config import DataArguments
    from asymvlm.federated.config import FederatedArguments
    from asymvlm.heads import HeadConfig
    from asymvlm.training.federate import federate
    from asymvlm.training.loop import train

    cache = small_cache(tmp_path / "cache", n_images=90)
    head = HeadConfig(hidden_dims=[8])
    torch.manual_seed(1)
    start = AsymVLM(TextHead(config=dataclasses.replace(head, dim=16)), logit_scale=0.5)
    start = start.save_pretrained(tmp_path / "start")
    hub = hub_cache(tmp_path, "alice/start", start, {"main": "a" * 40})
    use_hub_cache(monkeypatch, hub)
    a = train(train_config(cache, tmp_path / "a", init_from=str(start)))
    b = train(train_config(cache, tmp_path / "b", init_from="alice/start"))
    ma, mb = (AsymVLM.from_pretrained(p, load_encoder=False) for p in (a, b))
    assert all(torch.equal(v, mb.head.state_dict()[k]) for k, v in ma.head.state_dict().items())
    assert mb.lineage["init_from"] == "alice/start"
    assert mb.lineage["init_from_fingerprint"] == ma.lineage["init_from_fingerprint"]
    assert card_record(b / "README.md")["recipe"]["init_from"] == "alice/start"

    def fed(out, init_from):
        return FederatedArguments(rounds=2, num_clients=3, local_steps=2, local_batch_size=16, output_dir=str(out),
                                  progress=False, local_lr=0.2, init_from=init_from)  # fmt: skip

    s1, _, p1 = federate(DataArguments(cache_dir=str(cache)), head, fed(tmp_path / "f1", str(start)), {})
    s2, _, p2 = federate(DataArguments(cache_dir=str(cache)), head, fed(tmp_path / "f2", "alice/start"), {})
    assert all(torch.equal(v, s2.params[k]) for k, v in s1.params.items())
    assert AsymVLM.from_pretrained(p2, load_encoder=False).lineage["init_from"] == "alice/start"
    hub_cache(tmp_path, "alice/federated", p2, {"main": "b" * 40})  # the export, shared
    shared = AsymVLM.from_pretrained("alice/federated", load_encoder=False)
    saved = AsymVLM.from_pretrained(p2, load_encoder=False)
    assert all(torch.equal(v, saved.head.state_dict()[k]) for k, v in shared.head.state_dict().items())
    with pytest.raises(ArtefactError, match="not in the local Hub cache"):
        train(train_config(cache, tmp_path / "c", init_from="alice/not-there"))


def test_logs_read_for_cards_name_a_corrupt_line(tmp_path):
    from asymvlm.hub import eval_metrics
    from asymvlm.io import read_jsonl

    log = tmp_path / "train_log.jsonl"
    assert read_jsonl(log) == []  # no log yet: nothing to report
    log.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "eval/R@1": 0.5, "loss": 1.5}\n')
    records = read_jsonl(log)
    assert [r["step"] for r in records] == [1, 2] and eval_metrics(records[1]) == {"R@1": 0.5}
    log.write_text('{"step": 1}\n{"step": 2, "loss"\n')
    with pytest.raises(ArtefactError, match=r"corrupt JSON in .*train_log.jsonl, line 2"):
        read_jsonl(log)
