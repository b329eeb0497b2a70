"""Issue 26, the core's part: nothing read from outside is trusted, nothing of the user's is lost.

* ``atomic_directory`` never removes a folder that holds a user's entries: a move that fails puts
  back what was moved; a run killed between the moves and the exchange is recovered by the next run.
* Every JSON reader turns hostile nesting into one error naming the file.
* Paths named inside artefacts (``text_base_delta``, ``text_adapter``, ``metadata.jsonl`` file names,
  Hub revisions) stay inside their folder.
* Model cards name no absolute server path.
* A model config is checked field by field (types, ranges) before anything is allocated; weights
  that do not fit the config (dtype, family) are an error.
* An image that is too large or truncated is one error naming the file.
* Nothing non-finite is saved.
"""

from __future__ import annotations

import io as _io
import json
import os
import re
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import asymvlm.io as aio
from asymvlm.errors import ArtefactError, ConfigError, DatasetLayoutError
from asymvlm.heads import HeadConfig, TextHead
from asymvlm.model import AsymVLM

DEEP = "[" * 100_000 + "]" * 100_000


# ----------------------------------------------------------------------------------------------
# 1. atomic_directory loses nothing
# ----------------------------------------------------------------------------------------------
def _build(path: Path, files: dict[str, str]) -> None:
    with aio.atomic_directory(path) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def _with_user_entries(path: Path) -> None:
    _build(path, {"a.txt": "old"})
    (path / "notes.txt").write_text("mine")
    (path / "results").mkdir()
    (path / "results" / "r.csv").write_text("1,2")


def _user_entries_intact(path: Path) -> bool:
    return (
        (path / "notes.txt").is_file()
        and (path / "notes.txt").read_text() == "mine"
        and (path / "results" / "r.csv").read_text() == "1,2"
    )


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_move_that_fails_puts_the_users_entries_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _with_user_entries(out)
    real = os.replace

    def failing(src, dst):  # the read-only subfolder / immutable file: it cannot be moved
        if Path(src).name == "results":
            raise PermissionError(13, "Permission denied", str(src))
        return real(src, dst)

    monkeypatch.setattr(aio.os, "replace", failing)
    with pytest.raises(ArtefactError, match=r"results") as err:
        _build(out, {"a.txt": "new"})
    assert "nothing was changed" in str(err.value)
    assert _user_entries_intact(out)
    assert (out / "a.txt").read_text() == "old"  # the old contents stay
    assert _hidden(tmp_path) == []  # no temporary folder left behind


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("n", range(1, 8))
def test_any_failing_rename_loses_nothing(tmp_path, monkeypatch, n, exchange):
    out = tmp_path / "out"
    _with_user_entries(out)
    if not exchange:  # a system without renameat2(RENAME_EXCHANGE): two renames
        monkeypatch.setattr(aio, "_exchange", lambda a, b: False)
    real, calls = os.replace, []

    def nth(src, dst):
        calls.append(src)
        if len(calls) == n:
            raise OSError(5, "Input/output error", str(src))
        return real(src, dst)

    monkeypatch.setattr(aio.os, "replace", nth)
    try:
        _build(out, {"a.txt": "new"})
    except (OSError, ArtefactError):
        assert (out / "a.txt").read_text() == "old"
    else:
        assert (out / "a.txt").read_text() == "new"
    assert _user_entries_intact(out)
    assert _hidden(tmp_path) == []


def test_when_putting_back_fails_too_the_folder_is_kept_and_named(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _with_user_entries(out)
    real, state = os.replace, {"moved": 0}

    def failing(src, dst):
        if Path(src).parent == out and Path(src).name == "results":
            raise PermissionError(13, "Permission denied", str(src))
        if Path(dst).parent == out:  # putting back fails as well
            raise OSError(28, "No space left on device", str(dst))
        state["moved"] += 1
        return real(src, dst)

    monkeypatch.setattr(aio.os, "replace", failing)
    with pytest.raises(ArtefactError) as err:
        _build(out, {"a.txt": "new"})
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(left) == 1 and (left[0] / "notes.txt").read_text() == "mine"  # never removed
    assert left[0].name in str(err.value)
    monkeypatch.setattr(aio.os, "replace", real)
    with pytest.warns(UserWarning, match="recovered"):
        _build(out, {"a.txt": "newer"})  # the next run puts them back
    assert _user_entries_intact(out) and (out / "a.txt").read_text() == "newer"
    assert _hidden(tmp_path) == []


def _killed_after_moves(out: Path, exchange: bool) -> None:
    """The state a kill -9 leaves between the moves and the exchange (or between the two renames)."""
    tmp = out.parent / ".out.tmp-deadbeef"
    tmp.mkdir()
    (tmp / "a.txt").write_text("new")
    (tmp / aio.MANIFEST_NAME).write_text(json.dumps({"entries": ["a.txt"]}))
    os.replace(out / "notes.txt", tmp / "notes.txt")
    os.replace(out / "results", tmp / "results")
    if not exchange:  # killed between os.replace(path, old) and os.replace(tmp, path)
        os.replace(out, out.parent / ".out.old-deadbeef")


@pytest.mark.parametrize("exchange", [True, False])
def test_a_killed_runs_leftover_is_recovered_by_the_next_run(tmp_path, exchange):
    out = tmp_path / "out"
    _with_user_entries(out)
    _killed_after_moves(out, exchange)
    with pytest.warns(UserWarning, match=r"\.out\.tmp-deadbeef"):
        _build(out, {"a.txt": "newer"})
    assert _user_entries_intact(out)
    assert (out / "a.txt").read_text() == "newer"
    assert _hidden(tmp_path) == []


def test_a_live_runs_temporary_folder_is_left_alone(tmp_path):
    out = tmp_path / "out"
    _with_user_entries(out)
    with aio.atomic_directory(out) as tmp:  # a run in progress (its folder is locked)
        (tmp / "a.txt").write_text("first")
        (tmp / aio.MANIFEST_NAME).write_text(json.dumps({"entries": ["a.txt"]}))
        (tmp / "stray.txt").write_text("not asymvlm's")  # looks like a user entry in flight
        _build(tmp_path / "other", {"x": "y"})  # another target: never looks at out's folders
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ArtefactError):  # same target, concurrently: the clash, not a recovery
                _build(out, {"notes.txt": "clash"})
        assert (tmp / "stray.txt").is_file()
        (tmp / "stray.txt").unlink()
        (tmp / aio.MANIFEST_NAME).unlink()
    assert (out / "a.txt").read_text() == "first" and _user_entries_intact(out)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may rename anything")
def test_a_read_only_subfolder_is_reported_not_lost(tmp_path):
    out = tmp_path / "out"
    _with_user_entries(out)
    (out / "results").chmod(0o555)
    try:
        with pytest.raises(ArtefactError, match="results"):
            _build(out, {"a.txt": "new"})
        assert _user_entries_intact(out)
    finally:
        (out / "results").chmod(0o755)


# ----------------------------------------------------------------------------------------------
# 2. every JSON reader: deep nesting (and NaN where a value must be finite) is one clear error
# ----------------------------------------------------------------------------------------------
def test_read_json_deep_nesting_names_the_file(tmp_path):
    p = tmp_path / "gallery.json"
    p.write_text(DEEP)
    with pytest.raises(ArtefactError, match=re.escape(str(p))):
        aio.read_json(p)
    with pytest.raises(ArtefactError, match=re.escape(str(p))):
        aio.read_tagged_json(p, "x", 1, (), ())


def test_read_jsonl_deep_nesting_names_the_file_and_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"a": 1}\n' + DEEP + "\n")
    with pytest.raises(ArtefactError, match=re.escape(f"{p}, line 2")):
        aio.read_jsonl(p)


def test_a_deep_manifest_is_not_asymvlms(tmp_path):
    (tmp_path / aio.MANIFEST_NAME).write_text(DEEP)
    assert aio.owned_entries(tmp_path) is None


def test_a_deep_safetensors_header_names_the_file(tmp_path):
    raw = DEEP.encode()
    p = tmp_path / "w.safetensors"
    p.write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(ArtefactError, match=re.escape(str(p))):
        aio.mmap_safetensors(p)
    with pytest.raises(ArtefactError, match=re.escape(str(p))):
        aio.LazyParams(p)


def test_deep_dataset_files_name_the_file(tmp_path):
    from asymvlm.worlds.data import load_coco_2017, load_image_folder

    (tmp_path / "metadata.jsonl").write_text(DEEP + "\n")
    with pytest.raises(DatasetLayoutError, match="metadata.jsonl:1"):
        load_image_folder(tmp_path)
    (tmp_path / "captions.json").write_text(DEEP)
    with pytest.raises(DatasetLayoutError, match="captions.json"):
        load_coco_2017(tmp_path / "captions.json", tmp_path)


def test_deep_artefact_files_are_not_a_traceback(tmp_path):
    from asymvlm.hub import artefact_kind

    (tmp_path / "asymvlm_config.json").write_text(DEEP)
    with pytest.raises(ArtefactError, match="not an asymvlm artefact"):
        artefact_kind(tmp_path)
    with pytest.raises(ArtefactError, match="asymvlm_config.json"):
        AsymVLM.from_pretrained(tmp_path)


def test_deep_open_clip_config_names_the_file(tmp_path):
    from asymvlm.encoders import OpenCLIPEncoder

    (tmp_path / "open_clip_config.json").write_text(DEEP)
    with pytest.raises(ArtefactError, match="open_clip_config.json"):
        OpenCLIPEncoder._config(f"local-dir:{tmp_path}")


# ----------------------------------------------------------------------------------------------
# model folders: the config, checked field by field
# ----------------------------------------------------------------------------------------------
def _saved(tmp_path, **head) -> Path:
    m = AsymVLM(TextHead(dim=8, hidden_dims=(16,), **head), logit_scale=1.5)
    return m.save_pretrained(tmp_path / "m", card=False)


def _edit(folder: Path, fn) -> None:
    path = folder / "asymvlm_config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def _set(section, key, value):
    def fn(cfg):
        (cfg[section] if section else cfg)[key] = value

    return fn


@pytest.mark.parametrize(
    "edit,field",
    [
        (_set("head", "hidden_dims", 32), "hidden_dims"),
        (_set("head", "hidden_dims", [1e10]), "hidden_dims"),
        (_set("head", "hidden_dims", [10**10]), "hidden_dims"),
        (_set("head", "hidden_dims", [16.0]), "hidden_dims"),
        (_set("head", "hidden_dims", [True]), "hidden_dims"),
        (_set("head", "hidden_dims", "16"), "hidden_dims"),
        (_set("head", "dim", 10**9), "dim"),
        (_set("head", "dim", 8.0), "dim"),
        (_set("head", "residual", "yes"), "residual"),
        (_set("head", "family", ["vmf"]), "family"),
        (_set("head", "family", "ps"), "family"),  # switched against the saved weights
        (_set("head", "activation", None), "activation"),
        (_set("head", "direction", {"a": 1}), "direction"),
        (_set("head", "min_concentration", "0.001"), "min_concentration"),
        (_set("head", "max_concentration", None), "max_concentration"),
        (_set("head", "init_concentration", [1]), "init_concentration"),
        (_set(None, "logit_scale", None), "logit_scale"),
        (_set(None, "logit_scale", "1.5"), "logit_scale"),
        (_set(None, "logit_scale", True), "logit_scale"),
        (_set(None, "encoder", "open_clip:x"), "encoder"),
        (_set(None, "encoder", {"spec": 5}), "encoder"),
        (_set(None, "lineage", ["x"]), "lineage"),
        (_set(None, "head", ["x"]), "head"),
    ],
)
def test_a_mutated_model_config_is_one_error_naming_file_and_field(tmp_path, monkeypatch, edit, field):
    folder = _saved(tmp_path)
    _edit(folder, edit)
    real_linear = torch.nn.Linear

    class NoHugeLinear(real_linear):  # nothing huge is allocated before the config is checked
        def __init__(self, a, b, *args, **kwargs):
            assert a * b < 10**7, f"allocating a {a} x {b} layer before checking the config"
            super().__init__(a, b, *args, **kwargs)

    monkeypatch.setattr(torch.nn, "Linear", NoHugeLinear)
    with pytest.raises(ArtefactError) as err:
        AsymVLM.from_pretrained(folder)
    message = str(err.value)
    assert "asymvlm_config.json" in message or "head.safetensors" in message, message
    assert field in message, message
    assert "\n" not in message


def test_nan_in_a_model_config_is_an_error(tmp_path):
    folder = _saved(tmp_path)
    path = folder / "asymvlm_config.json"
    path.write_text(path.read_text().replace('"logit_scale": 1.5', '"logit_scale": NaN'))
    assert "NaN" in path.read_text()
    with pytest.raises(ArtefactError, match="asymvlm_config.json"):
        AsymVLM.from_pretrained(folder)


def test_int_weights_are_an_error_naming_the_key(tmp_path):
    folder = _saved(tmp_path)
    state = load_file(folder / "head.safetensors")
    state["mlp.0.weight"] = state["mlp.0.weight"].round().to(torch.int64)
    save_file(state, folder / "head.safetensors")
    with pytest.raises(ArtefactError, match=r"head\.safetensors.*mlp\.0\.weight"):
        AsymVLM.from_pretrained(folder)


def test_non_finite_weights_on_disk_are_an_error(tmp_path):
    folder = _saved(tmp_path)
    state = load_file(folder / "head.safetensors")
    state["mlp.0.bias"][3] = float("nan")
    save_file(state, folder / "head.safetensors")
    with pytest.raises(ArtefactError, match=r"head\.safetensors.*mlp\.0\.bias"):
        AsymVLM.from_pretrained(folder)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(residual="yes"), "residual"),
        (dict(hidden_dims=(10**10,)), "hidden_dims"),
        (dict(hidden_dims=32), "hidden_dims"),
        (dict(hidden_dims=(16.5,)), "hidden_dims"),
        (dict(dim=True), "dim"),
        (dict(max_concentration=float("inf")), "max_concentration"),
        (dict(min_concentration=float("nan")), "min_concentration"),
        (dict(family=None), "family"),
    ],
)
def test_head_config_is_checked_on_construction(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        HeadConfig(**{"dim": 8, "hidden_dims": (16,), **kwargs})


def test_head_arguments_bound_the_widths():
    from asymvlm.heads import HeadConfig

    with pytest.raises(ConfigError, match="hidden_dims"):
        HeadConfig(hidden_dims=[10**10])


def test_a_valid_model_still_loads_equal(tmp_path):
    m = AsymVLM(TextHead(dim=8, hidden_dims=(16,), family="ps", residual=True), logit_scale=0.5)
    folder = m.save_pretrained(tmp_path / "m", card=False)
    back = AsymVLM.from_pretrained(folder)
    x = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    assert torch.equal(back.uncertainty(x), m.uncertainty(x)) and back.family == "ps"


# ----------------------------------------------------------------------------------------------
# 3. paths inside artefacts stay inside
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["text_base_delta", "text_adapter"])
@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink", "not-a-string"])
def test_config_paths_stay_inside_the_model_folder(tmp_path, key, where):
    folder = _saved(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"w": torch.zeros(2)}, outside / "delta.safetensors")
    (outside / "adapter_config.json").write_text("{}")
    target = outside / ("delta.safetensors" if key == "text_base_delta" else "")
    if where == "absolute":
        value = str(target)
    elif where == "dotdot":
        value = os.path.relpath(target, folder)
        assert value.startswith("..")
    elif where == "symlink":
        (folder / "link").symlink_to(target)
        value = "link"
    else:
        value = 5
    _edit(folder, _set(None, key, value))
    with pytest.raises(ArtefactError, match=rf"asymvlm_config.json.*{key}"):
        AsymVLM.from_pretrained(folder, load_encoder=False)


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside.png", "a/../../outside.png", 5, ""])
def test_metadata_file_names_stay_inside_the_collection(tmp_path, name):
    from PIL import Image

    from asymvlm.worlds.data import load_image_folder

    Image.new("RGB", (8, 8), "red").save(tmp_path / "outside.png")
    root = tmp_path / "collection"
    root.mkdir()
    Image.new("RGB", (8, 8), "blue").save(root / "a.png")
    lines = [{"file_name": "a.png", "text": "blue"}, {"file_name": name, "text": "red"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    with pytest.raises(DatasetLayoutError, match=r"metadata.jsonl:2.*file_name"):
        load_image_folder(root, check_files=False)


def test_karpathy_file_names_stay_inside_the_image_root(tmp_path):
    from asymvlm.worlds.data import load_coco_karpathy

    doc = {"images": [{"filepath": "..", "filename": "x.jpg", "split": "test", "sentences": [{"raw": "a"}]}]}
    (tmp_path / "k.json").write_text(json.dumps(doc))
    (tmp_path / "root").mkdir()
    with pytest.raises(DatasetLayoutError, match="k.json"):
        load_coco_karpathy(tmp_path / "k.json", tmp_path / "root", check_files=False)


@pytest.mark.parametrize(
    "name,revision",
    [
        ("alice/heads", "../../../x"),
        ("alice/heads", "refs/../../x"),
        ("alice/heads", "/etc"),
        ("alice/heads", "a\\..\\b"),
        ("alice/heads", "v1\n"),
        ("alice/heads@../../x", None),
        ("alice/heads@..", None),
    ],
)
def test_a_hub_revision_with_a_path_is_rejected_before_any_lookup(monkeypatch, name, revision):
    import huggingface_hub

    from asymvlm.hub import resolve_artefact

    def boom(*a, **k):
        raise AssertionError("snapshot_download reached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", boom)
    with pytest.raises(ArtefactError, match="revision"):
        resolve_artefact(name, revision=revision)


def test_ordinary_revisions_are_accepted():
    from asymvlm.hub import check_revision

    for rev in ("main", "v1.0", "refs/pr/1", "a" * 40, "feature/x-y_z"):
        assert check_revision(rev) == rev


# ----------------------------------------------------------------------------------------------
# 4. model cards name no server path
# ----------------------------------------------------------------------------------------------
def test_a_model_card_names_no_absolute_path(tmp_path):
    secret = "/srv/secret-team/models"
    source = {
        "spec": f"open_clip:local-dir:{secret}/clip-b32",
        "pretrained": f"{secret}/weights/ckpt.safetensors",
        "fingerprint": "ab" * 32,
        "dim": 8,
    }
    m = AsymVLM(
        TextHead(dim=8, hidden_dims=(16,)),
        encoder_source=source,
        lineage={"init_from": f"{secret}/base", "init_from_fingerprint": "cd" * 32},
    )
    info = {
        "data": {"dataset": f"imagefolder:{secret}/photos", "cache": "c"},
        "recipe": {"output_dir": f"{secret}/runs/a", "val": [f"{secret}/val1"], "url": "https://arxiv.org/abs/1"},
        "metrics": {f"{secret}/val1": {"r1": 0.5}},
    }
    folder = m.save_pretrained(tmp_path / "m", card=info)
    card = (folder / "README.md").read_text()
    assert "/srv" not in card and "secret-team/models/" not in card, card
    assert "clip-b32" in card and "https://arxiv.org/abs/1" in card
    assert json.loads((folder / "asymvlm_config.json").read_text())["encoder"]["spec"] == source["spec"]
    from asymvlm.hub import card_from_folder

    assert "/srv" not in str(card_from_folder(folder, repo_id="alice/x"))


# ----------------------------------------------------------------------------------------------
# 5. images: too large, truncated: one error naming the file
# ----------------------------------------------------------------------------------------------
def _png_claiming(path: Path, width: int, height: int) -> None:
    from PIL import Image

    buf = _io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + "IHDR"
    raw[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(raw[12 : ihdr + 13])) & 0xFFFFFFFF
    raw[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(raw))


def _truncated_jpeg(path: Path) -> None:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    pixels = (torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()
    buf = _io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


class _FakeEncoder:
    spec, pretrained, fingerprint, dim = "fake:enc", None, "f" * 64, 4

    def encode_image(self, images, **kw):
        return torch.nn.functional.normalize(torch.ones(len(images), 4), dim=-1)

    def encode_text(self, texts, **kw):
        return torch.nn.functional.normalize(torch.ones(len(texts), 4), dim=-1)


@pytest.mark.parametrize("kind", ["huge", "truncated"])
@pytest.mark.parametrize("as_dataset", [False, True])
def test_a_bad_image_in_a_collection_is_one_error_naming_the_file(tmp_path, kind, as_dataset):
    from PIL import Image

    from asymvlm.cache import embed_dataset
    from asymvlm.worlds.data import load_image_folder

    root = tmp_path / "photos"
    root.mkdir()
    Image.new("RGB", (8, 8), "blue").save(root / "ok.png")
    bad = root / ("bad.png" if kind == "huge" else "bad.jpg")
    if kind == "huge":
        _png_claiming(bad, 20_000, 20_000)  # 400 MP
    else:
        _truncated_jpeg(bad)
    rows = [{"file_name": "ok.png", "text": "blue"}, {"file_name": bad.name, "text": "bad"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = (
        load_image_folder(root)
        if as_dataset
        else [{"image": str(root / r["file_name"]), "captions": [r["text"]]} for r in rows]
    )
    with pytest.raises(ArtefactError, match=re.escape(bad.name)) as err:
        embed_dataset(_FakeEncoder(), data, tmp_path / "cache", progress=False, fingerprint="x")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists()


def test_load_rgb_still_reads_good_images(tmp_path):
    from PIL import Image

    from asymvlm.cache import load_rgb

    Image.new("L", (5, 3), 7).save(tmp_path / "g.png")
    im = load_rgb(tmp_path / "g.png")
    assert im.mode == "RGB" and im.size == (5, 3)
    assert load_rgb({"path": str(tmp_path / "g.png"), "bytes": None}).size == (5, 3)


# ----------------------------------------------------------------------------------------------
# caches: provenance and manifest types
# ----------------------------------------------------------------------------------------------
def _cache(tmp_path, **kw):
    from asymvlm.cache import write_cache

    x = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    return write_cache(tmp_path / "c", x, x, torch.arange(3), **kw).path


@pytest.mark.parametrize(
    "key,value",
    [("encoder", None), ("encoder", {"dim": "8"}), ("num_images", "3"), ("num_texts", -1), ("dtype", "int8"),
     ("dataset_fingerprint", 5), ("encoder", {"dim": 4, "fingerprint": 5})],
)  # fmt: skip
def test_a_mutated_cache_manifest_names_file_and_field(tmp_path, key, value):
    from asymvlm.cache import EmbeddingCache

    path = _cache(tmp_path)
    doc = json.loads((path / "manifest.json").read_text())
    doc[key] = value
    (path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ArtefactError, match=rf"manifest.json.*{key}"):
        EmbeddingCache.load(path)


@pytest.mark.parametrize("fingerprint", [None, ""])
def test_a_cache_without_provenance_is_an_error_when_an_encoder_is_asked_for(tmp_path, fingerprint):
    from asymvlm.cache import EmbeddingCache
    from asymvlm.errors import CacheMismatchError

    path = _cache(tmp_path, encoder={"spec": "x", "fingerprint": fingerprint})
    with pytest.raises(CacheMismatchError, match="records no encoder fingerprint"):
        EmbeddingCache.load(path, encoder_fingerprint="a" * 64)
    EmbeddingCache.load(path)  # without a request it loads (features made elsewhere)


# ----------------------------------------------------------------------------------------------
# 6. nothing non-finite is saved
# ----------------------------------------------------------------------------------------------
def test_atomic_save_safetensors_refuses_non_finite(tmp_path):
    t = torch.ones(3)
    t[1] = float("inf")
    with pytest.raises(ArtefactError, match=r"'w'.*x\.safetensors"):
        aio.atomic_save_safetensors({"w": t, "ok": torch.ones(1)}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []
    aio.atomic_save_safetensors({"w": t}, tmp_path / "x.safetensors", check_finite=False)  # an explicit opt-out
    assert torch.isinf(load_file(tmp_path / "x.safetensors")["w"][1])
    aio.atomic_save_safetensors({"i": torch.arange(3)}, tmp_path / "i.safetensors")  # ints: nothing to check


@pytest.mark.parametrize("what", ["weight", "logit_scale", "base_delta"])
def test_a_non_finite_model_is_never_saved(tmp_path, what):
    head = TextHead(dim=8, hidden_dims=(16,))
    kwargs = {}
    if what == "weight":
        with torch.no_grad():
            head.mlp[0].weight[2, 3] = float("nan")
    elif what == "base_delta":
        kwargs["text_base_delta"] = {"w": torch.tensor([1.0, float("nan")])}
    m = AsymVLM(head, **kwargs)
    if what == "logit_scale":
        with pytest.raises(ConfigError, match="logit_scale"):
            AsymVLM(head, logit_scale=float("inf"))  # on construction
        m.logit_scale = float("inf")  # set afterwards (e.g. by a training step): caught on save
    out = tmp_path / "m"
    with pytest.raises(ArtefactError, match={"weight": r"mlp\.0\.weight", "logit_scale": "logit_scale",
                                             "base_delta": "'w'"}[what]):  # fmt: skip
        m.save_pretrained(out)
    assert not out.exists() or list(out.iterdir()) == []


def test_a_deep_yaml_config_names_the_file(tmp_path):
    from asymvlm.config import DataArguments, load_yaml

    p = tmp_path / "exp.yaml"
    p.write_text("train_images: " + DEEP + "\n")
    with pytest.raises(ConfigError, match=re.escape(str(p))):
        load_yaml(p, (DataArguments,))


def test_a_hub_snapshot_with_links_into_blobs_still_loads(tmp_path):
    """The Hub cache keeps a snapshot's files as links into the repo's blobs/: that is inside."""
    m = AsymVLM(TextHead(dim=8, hidden_dims=(16,)), text_base_delta={"w": torch.ones(2)})
    saved = m.save_pretrained(tmp_path / "saved", card=False)
    repo = tmp_path / "hub" / "models--alice--heads"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in saved.iterdir():
        if f.is_file():
            os.replace(f, repo / "blobs" / f.name)
            (snap / f.name).symlink_to(Path("../..") / "blobs" / f.name)
    back = AsymVLM.from_pretrained(snap, load_encoder=False)
    assert torch.equal(back.text_base_delta["w"], torch.ones(2))


def test_check_cache_encoder_needs_provenance_on_both_sides(tmp_path):
    from asymvlm.cache import EmbeddingCache, check_cache_encoder
    from asymvlm.errors import CacheMismatchError

    with_fp = EmbeddingCache.load(_cache(tmp_path, encoder={"fingerprint": "ab" * 32}))
    check_cache_encoder(with_fp, "ab" * 32)
    with pytest.raises(CacheMismatchError, match="another encoder"):
        check_cache_encoder(with_fp, "cd" * 32, what="model 'm'")
    with pytest.raises(CacheMismatchError, match="model 'm' records no encoder fingerprint"):
        check_cache_encoder(with_fp, None, what="model 'm'")
    os.rename(with_fp.path, tmp_path / "other")
    without = EmbeddingCache.load(_cache(tmp_path, encoder={"fingerprint": ""}))
    with pytest.raises(CacheMismatchError, match="records no encoder fingerprint"):
        check_cache_encoder(without, "ab" * 32)
    with pytest.warns(UserWarning, match="without checking"):
        check_cache_encoder(without, "ab" * 32, allow_missing=True)


def test_a_push_uploads_no_absolute_path(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from asymvlm.hub import push_to_hub

    uploaded = {}

    def create_commit(self, repo_id, operations, **kw):
        for op in operations:
            src = op.path_or_fileobj
            uploaded[op.path_in_repo] = src if isinstance(src, bytes) else Path(src).read_bytes()

    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: None)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    source = {"spec": "open_clip:local-dir:/srv/secret-team/models/clip", "fingerprint": "ab" * 32, "dim": 8}
    folder = AsymVLM(TextHead(dim=8, hidden_dims=(16,)), encoder_source=source).save_pretrained(tmp_path / "m")
    push_to_hub(folder, "alice/heads")
    assert set(uploaded) == {"README.md", "asymvlm_config.json", "head.safetensors"}
    for name in ("README.md", "asymvlm_config.json"):
        assert b"/srv" not in uploaded[name], name
    assert "/srv/secret-team" in (folder / "asymvlm_config.json").read_text()  # the folder is not changed
    assert json.loads(uploaded["asymvlm_config.json"])["encoder"]["spec"] == "open_clip:local-dir:models/clip"


# ----------------------------------------------------------------------------------------------
# wave 2 (w2-model): the model folder's provenance, tensors and files, checked against what was saved
# ----------------------------------------------------------------------------------------------
FP = "ab" * 32


def _full_model(tmp_path, name="m", seed=0) -> Path:
    torch.manual_seed(seed)
    source = {"spec": "open_clip:x", "pretrained": None, "fingerprint": FP, "dim": 8}
    lineage = {"init_from": "base", "init_from_fingerprint": "cd" * 32}
    m = AsymVLM(
        TextHead(dim=8, hidden_dims=(8,)),
        logit_scale=1.5,
        encoder_source=source,
        lineage=lineage,
        text_base_delta={"transformer.proj.weight": torch.randn(4, 4)},
    )
    return m.save_pretrained(tmp_path / name, card=False)


def _drop(section, key):
    def fn(cfg):
        del (cfg[section] if section else cfg)[key]

    return fn


@pytest.mark.parametrize(
    "edit,field",
    [
        (_drop(None, "encoder"), "encoder"),
        (_set(None, "encoder", None), "encoder"),
        (_set("encoder", "extra", 1), "encoder"),
        (_drop("encoder", "dim"), "encoder"),
        (_set("encoder", "dim", None), "encoder.dim"),
        (_drop("encoder", "fingerprint"), "encoder"),
        (_set("encoder", "fingerprint", None), "encoder.fingerprint"),
        (_drop("encoder", "pretrained"), "encoder"),
        (_set("encoder", "spec", None), "encoder.spec"),
        (_drop("head", "hidden_dims"), "hidden_dims"),
        (_set(None, "lineage", None), "lineage"),
        (_drop(None, "lineage"), "lineage"),
        (_set("lineage", "extra", 1), "lineage"),
        (_drop("lineage", "init_from"), "init_from"),
        (_set("lineage", "init_from", None), "init_from"),
        (_drop("lineage", "init_from_fingerprint"), "init_from_fingerprint"),
        (_drop(None, "logit_scale"), "logit_scale"),
        (_set(None, "logit_scale", 2**62), "logit_scale"),
        (_set(None, "logit_scale", 1e30), "logit_scale"),
        (_drop(None, "text_base_delta"), "text_base_delta"),
        (_set(None, "text_base_delta", None), "text_base_delta"),
    ],
)
def test_model_provenance_fields_are_required_and_checked(tmp_path, edit, field):
    folder = _full_model(tmp_path)
    _edit(folder, edit)
    with pytest.raises(ArtefactError) as err:
        AsymVLM.from_pretrained(folder, load_encoder=False)
    message = str(err.value)
    assert "asymvlm_config.json" in message and field in message and "\n" not in message, message


def test_the_documented_model_forms_still_load(tmp_path):
    # embeddings of unknown origin (encoder null), of an anonymous cache (spec/fingerprint null),
    # fingerprint-only features, a head trained from scratch, and no lineage at all
    h = TextHead(dim=8, hidden_dims=(8,))
    forms = [
        {},
        {"encoder_source": {"spec": None, "fingerprint": None, "dim": 8}},
        {"encoder_source": {"fingerprint": FP}},
        {"lineage": {"init_from": None, "init": "scratch"}},
    ]
    for i, kw in enumerate(forms):
        m = AsymVLM(h, logit_scale=-2.0, **kw)
        back = AsymVLM.from_pretrained(m.save_pretrained(tmp_path / str(i), card=False), load_encoder=False)
        assert back.encoder_source == m.encoder_source and back.lineage == m.lineage and back.logit_scale == -2.0
    assert m.encoder_source is None
    # a null fingerprint of a named encoder loads only when the caller waives the check
    m = AsymVLM(h, encoder_source={"spec": "open_clip:x", "fingerprint": None})
    folder = m.save_pretrained(tmp_path / "nofp", card=False)
    with pytest.raises(ArtefactError, match=r"asymvlm_config.json: encoder.fingerprint is null"):
        AsymVLM.from_pretrained(folder, load_encoder=False)
    assert AsymVLM.from_pretrained(folder, load_encoder=False, check_fingerprint=False).encoder_source["spec"]


def test_model_constructor_refuses_what_a_load_would_refuse():
    h = TextHead(dim=8, hidden_dims=(8,))
    for kw, field in [
        ({"logit_scale": 1e30}, "logit_scale"),
        ({"lineage": {"init_from": "x"}}, "init_from_fingerprint"),
        ({"lineage": {"init_from": "x", "init_from_fingerprint": "a", "more": 1}}, "more"),
        ({"encoder_source": {"spec": "x", "fingerprint": FP, "path": "/srv"}}, "path"),
        ({"encoder_source": {"spec": "x", "fingerprint": FP, "dim": 4}}, "dim"),
    ]:
        with pytest.raises(ConfigError, match=field):
            AsymVLM(h, **kw)


def _rewrite(path: Path, fn) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize(
    "name,edit,what",
    [
        ("head.safetensors", lambda t: t.update({k: v.half() for k, v in t.items()}), "saved as F32"),
        ("text_base_delta.safetensors", lambda t: t.update(extra=torch.zeros(2)), "unexpected ['extra']"),
        ("text_base_delta.safetensors", lambda t: t.pop("transformer.proj.weight"), "missing"),
        ("text_base_delta.safetensors", lambda t: t.update({"transformer.proj.weight": torch.zeros(5, 4)}), "[5, 4]"),
        (
            "text_base_delta.safetensors",
            lambda t: t.update({"transformer.proj.weight": torch.zeros(4, 4).half()}),
            "F16",
        ),
        (
            "text_base_delta.safetensors",
            lambda t: t.update({"transformer.proj.weight": torch.zeros(4, 4).long()}),
            "I64",
        ),
    ],
)
def test_model_tensors_must_be_those_saved(tmp_path, name, edit, what):
    folder = _full_model(tmp_path)
    _rewrite(folder / name, edit)
    with pytest.raises(ArtefactError) as err:
        AsymVLM.from_pretrained(folder, load_encoder=False)
    assert name in str(err.value) and what in str(err.value), str(err.value)


@pytest.mark.parametrize("name", ["asymvlm_config.json", "head.safetensors", "text_base_delta.safetensors"])
def test_model_files_linked_to_another_model_are_refused(tmp_path, name):
    folder, other = _full_model(tmp_path), _full_model(tmp_path, "other", seed=1)
    (folder / name).unlink()
    (folder / name).symlink_to(other / name)
    with pytest.raises(ArtefactError, match=re.escape(name)):
        AsymVLM.from_pretrained(folder, load_encoder=False)


def test_resaving_without_text_base_delta_removes_the_stale_file(tmp_path):
    folder = _full_model(tmp_path)
    AsymVLM(TextHead(dim=8, hidden_dims=(8,))).save_pretrained(folder, card=False)
    assert not (folder / "text_base_delta.safetensors").exists()
    assert AsymVLM.from_pretrained(folder).text_base_delta is None


def _tiny_merge_inputs(tmp_path):
    from asymvlm.merging.task_vectors import task_vector_from_checkpoints

    def ckpt(name, seed):
        g = torch.Generator().manual_seed(seed)
        save_file({"w": torch.randn(4, 4, generator=g)}, str(tmp_path / name))
        return tmp_path / name

    base = ckpt("base.safetensors", 0)
    for n, seed in (("a", 1), ("b", 2)):
        task_vector_from_checkpoints(base, ckpt(f"ft_{n}.safetensors", seed), tmp_path / f"tv_{n}")
    return base


def test_merge_files_linked_outside_their_folder_are_refused(tmp_path):
    from asymvlm.errors import AsymVLMError
    from asymvlm.merging.api import merge

    base = _tiny_merge_inputs(tmp_path)
    tv = tmp_path / "tv_a" / "task_vector.safetensors"
    tv.unlink()
    tv.symlink_to(tmp_path / "tv_b" / "task_vector.safetensors")
    with pytest.raises(AsymVLMError, match="task_vector.safetensors"):
        merge(base, [tmp_path / "tv_a", tmp_path / "tv_b"], tmp_path / "out", "task_arithmetic")
    merge(base, [tmp_path / "tv_b"], tmp_path / "m1", "task_arithmetic")
    merge(base, [tmp_path / "tv_b"], tmp_path / "m2", "task_arithmetic", lam=0.5)
    (tmp_path / "m1" / "model.safetensors").unlink()
    (tmp_path / "m1" / "model.safetensors").symlink_to(tmp_path / "m2" / "model.safetensors")
    with pytest.raises(AsymVLMError, match="model.safetensors"):
        merge(base, [tmp_path / "m1"], tmp_path / "out", "task_arithmetic")


@pytest.mark.parametrize("content", [b"[" * 100000, b'{"a": ', b"\xad\xff", None, b"[1]"])
def test_read_report_is_one_error_naming_merge_json(tmp_path, content):
    from asymvlm.merging.api import read_report

    (tmp_path / "out").mkdir()
    if content is not None:
        (tmp_path / "out" / "merge.json").write_bytes(content)
    with pytest.raises(ArtefactError, match="merge.json"):
        read_report(tmp_path / "out")
