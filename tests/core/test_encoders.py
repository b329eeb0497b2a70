"""asymvlm.encoders: both ecosystems, loaded offline from tiny models the tests write."""

import sys

import pytest
import torch
import torch.nn.functional as F

from asymvlm.encoders import MissingExtraError, load_encoder, parse_spec, weights_fingerprint

TEXTS = ["a red circle", "a photo of a big blue square", "an object in the top left"]


def test_open_clip_local_checkpoint_and_dir_load_identically(tmp_path, make_tiny_open_clip, make_images):
    import open_clip

    directory, model = make_tiny_open_clip(tmp_path / "tiny", seed=3)
    images = make_images(4)
    tokenizer = open_clip.get_tokenizer("asymvlm-tiny-vit")
    _, _, preprocess = open_clip.create_model_and_transforms("asymvlm-tiny-vit")
    model.eval()
    with torch.no_grad():
        ref_t = F.normalize(model.encode_text(tokenizer(TEXTS)), dim=-1)
        ref_i = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in images])), dim=-1)
    ckpt = directory / "open_clip_model.safetensors"
    encoders = [
        load_encoder("open_clip:asymvlm-tiny-vit", pretrained=str(ckpt), device="cpu"),
        load_encoder(f"open_clip:{directory}", device="cpu"),
        load_encoder(f"open_clip:local-dir:{directory}", device="cpu"),
        load_encoder(str(directory), device="cpu"),
    ]
    for enc in encoders:
        assert enc.dim == 32 and enc.backend == "open_clip"
        assert torch.equal(enc.tokenize(TEXTS)["input_ids"], tokenizer(TEXTS))
        assert torch.equal(enc.tokenizer(TEXTS), tokenizer(TEXTS))
        t, i = enc.encode_text(TEXTS), enc.encode_image(images, batch_size=3)
        assert t.dtype == torch.float32 and t.shape == (3, 32) and i.shape == (4, 32)
        torch.testing.assert_close(t, ref_t, rtol=0, atol=1e-6)
        torch.testing.assert_close(i, ref_i, rtol=0, atol=1e-6)
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
        assert not enc.model.training and not any(p.requires_grad for p in enc.model.parameters())
    # the same spec and weights give the same fingerprint, reload after reload
    fps = {e.fingerprint for e in encoders[1:]}
    assert len(fps) == 1 and fps == {load_encoder(str(directory)).fingerprint}
    # a moved checkpoint keeps its fingerprint; other weights at the same place change it
    import shutil

    shutil.copytree(directory, tmp_path / "moved")
    assert load_encoder(str(tmp_path / "moved")).fingerprint == encoders[1].fingerprint
    make_tiny_open_clip(tmp_path / "moved", seed=4)
    assert load_encoder(str(tmp_path / "moved")).fingerprint != encoders[1].fingerprint


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_transformers_models_load_and_match_direct_calls(kind, tiny_hf_dirs, make_images):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    path = tiny_hf_dirs[kind]
    enc = load_encoder(f"hf:{path}", device="cpu")
    same = load_encoder(str(path), device="cpu")
    images = make_images(3)
    model = AutoModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    proc = AutoImageProcessor.from_pretrained(path)
    padding = "max_length" if kind == "siglip" else True
    inputs = tok(TEXTS, padding=padding, max_length=16, truncation=True, return_tensors="pt")
    if kind == "siglip":
        inputs = {"input_ids": inputs["input_ids"]}
    with torch.no_grad():
        ref_t = model.get_text_features(**inputs)
        ref_i = model.get_image_features(pixel_values=proc(images=images, return_tensors="pt")["pixel_values"])
    ref_t = F.normalize(ref_t if isinstance(ref_t, torch.Tensor) else ref_t.pooler_output, dim=-1)
    ref_i = F.normalize(ref_i if isinstance(ref_i, torch.Tensor) else ref_i.pooler_output, dim=-1)
    for e in (enc, same):
        torch.testing.assert_close(e.encode_text(TEXTS, batch_size=2), ref_t, rtol=0, atol=1e-6)
        torch.testing.assert_close(e.encode_image(images), ref_i, rtol=0, atol=1e-6)
    assert enc.dim == (24 if kind == "clip" else 32)
    assert enc.fingerprint == same.fingerprint
    # preprocessed pixels are accepted as well
    torch.testing.assert_close(enc.encode_image(enc.preprocess(images)), ref_i, rtol=0, atol=1e-6)


def test_fingerprint_is_the_same_in_another_process(tiny_open_clip_dir, tiny_hf_dirs):
    import subprocess

    code = "import sys; from asymvlm.encoders import load_encoder; print(load_encoder(sys.argv[1]).fingerprint)"
    for path in (tiny_open_clip_dir, tiny_hf_dirs["siglip"]):
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == load_encoder(str(path)).fingerprint


def test_fingerprint_is_stable_and_weight_sensitive():
    lin = torch.nn.Linear(3, 2)
    a = weights_fingerprint(lin, "x")
    assert a == weights_fingerprint(lin, "x") and a != weights_fingerprint(lin, "y")
    with torch.no_grad():
        lin.weight[0, 0] += 1e-6
    assert weights_fingerprint(lin, "x") != a


def test_parse_spec_grammar(tmp_path, tiny_open_clip_dir, tiny_hf_dirs):
    assert parse_spec("open_clip:ViT-B-32") == ("open_clip", "ViT-B-32")
    assert parse_spec("open_clip:hf-hub:timm/ViT-B-16-SigLIP") == ("open_clip", "hf-hub:timm/ViT-B-16-SigLIP")
    assert parse_spec("hf:google/siglip-base-patch16-224") == ("hf", "google/siglip-base-patch16-224")
    assert parse_spec(str(tiny_open_clip_dir)) == ("open_clip", f"local-dir:{tiny_open_clip_dir}")
    assert parse_spec(str(tiny_hf_dirs["clip"])) == ("hf", str(tiny_hf_dirs["clip"]))
    for bad, msg in [
        ("", "non-empty"),
        ("ViT-B-32", "cannot parse"),
        ("open_clip:", "names no model"),
        (str(tmp_path), "neither open_clip_config.json"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_spec(bad)


def test_bad_loads_have_clear_errors(tmp_path, tiny_hf_dirs):
    with pytest.raises(ValueError, match="unknown open_clip model 'No-Such-Model'"):
        load_encoder("open_clip:No-Such-Model")
    with pytest.raises(ValueError, match="pretrained= is for open_clip"):
        load_encoder(f"hf:{tiny_hf_dirs['clip']}", pretrained="openai")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_encoder(f"open_clip:local-dir:{tmp_path}")
    # a transformers model that is not a dual encoder
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=30)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="not a dual encoder"):
        load_encoder(f"hf:{tmp_path / 'bert'}")


def test_pretrained_tag_offline_fails_with_a_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="pass the path of a local checkpoint"):
        load_encoder("open_clip:asymvlm-tiny-vit", pretrained="no-such-tag")


def test_missing_timm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    with pytest.raises(MissingExtraError, match=r"asymvlm\[siglip\]"):
        load_encoder("open_clip:ViT-B-16-SigLIP")


def test_encode_bad_input(tiny_encoder):
    with pytest.raises(TypeError, match="list of strings"):
        tiny_encoder.encode_text("a red circle")
    with pytest.raises(ValueError, match="no texts"):
        tiny_encoder.encode_text([])
    with pytest.raises(ValueError, match="no images"):
        tiny_encoder.encode_image([])
