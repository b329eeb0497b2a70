"""Saved AsymVLMs load from a Hugging Face Hub id as from a folder (asymvlm/hub.py), offline from a
Hub cache the test lays out as huggingface_hub writes it (models--owner--name/{refs,snapshots})."""

import shutil

import pytest
import torch

from asymvlm.errors import ArtefactError
from asymvlm.heads import TextHead
from asymvlm.hub import looks_like_hub_id, resolve_artefact
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
