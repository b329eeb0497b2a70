"""asymvlm.model.AsymVLM: encoding, likelihoods, save/load without pickle."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from asymvlm.heads import TextHead
from asymvlm.io import ArtefactError
from asymvlm.losses import log_likelihood
from asymvlm.model import AsymVLM, EncoderMismatchError


def unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


@pytest.fixture
def model(tiny_encoder):
    torch.manual_seed(0)
    return AsymVLM(TextHead(dim=32, family="vmf", hidden_dims=(64,)), tiny_encoder, logit_scale=1.5)


def test_encode_text_image_and_likelihood(model, tiny_encoder, make_images):
    texts = ["a red circle", "a blue square"]
    q = model.encode_text(texts)
    ref = model.head(tiny_encoder.encode_text(texts))
    torch.testing.assert_close(q.loc, ref.loc)
    torch.testing.assert_close(model.uncertainty(texts), 1 / ref.concentration)
    images = model.encode_image(make_images(3))
    torch.testing.assert_close(images, tiny_encoder.encode_image(make_images(3)))
    ll = model.log_likelihood(texts, images)
    assert ll.shape == (2, 3)
    torch.testing.assert_close(ll, log_likelihood(ref, images))
    torch.testing.assert_close(model.log_likelihood(q, images), ll)
    # embeddings work too
    torch.testing.assert_close(model.uncertainty(tiny_encoder.encode_text(texts)), model.uncertainty(texts))


def test_save_and_load_roundtrip(tmp_path, model, tiny_encoder):
    model.save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["README.md", "asymvlm_config.json", "head.safetensors"]  # encoder referenced, not copied
    cfg = json.loads((tmp_path / "m" / "asymvlm_config.json").read_text())
    assert cfg["type"] == "asymvlm" and cfg["format_version"] == 1
    assert cfg["encoder"]["spec"] == tiny_encoder.spec and cfg["encoder"]["fingerprint"] == tiny_encoder.fingerprint
    loaded = AsymVLM.from_pretrained(tmp_path / "m")
    assert loaded.encoder is not None and loaded.logit_scale == 1.5
    texts = ["a red circle", "the photo of an object"]
    torch.testing.assert_close(loaded.uncertainty(texts), model.uncertainty(texts))
    no_enc = AsymVLM.from_pretrained(tmp_path / "m", load_encoder=False)
    assert no_enc.encoder is None and no_enc.encoder_source["fingerprint"] == tiny_encoder.fingerprint
    emb = tiny_encoder.encode_text(texts)
    torch.testing.assert_close(no_enc.uncertainty(emb), model.uncertainty(texts))


def test_embeddings_only_model(tmp_path):
    m = AsymVLM(TextHead(dim=16, family="ps", hidden_dims=(8,)))
    t = unit(4, 16)
    assert m.encode_text(t).batch_shape == (4,)
    with pytest.raises(ValueError, match="has no encoder, so it cannot encode strings"):
        m.encode_text(["a red circle"])
    with pytest.raises(ValueError, match="cannot encode images"):
        m.encode_image(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"dimension 12 \(shape \(2, 12\)\)"):
        m.uncertainty(torch.randn(2, 12))
    m.save_pretrained(tmp_path / "m")
    back = AsymVLM.from_pretrained(tmp_path / "m")
    assert back.encoder is None and back.family == "ps"
    torch.testing.assert_close(back.uncertainty(t), m.uncertainty(t))
    with pytest.raises(ValueError, match="saved without an encoder"):
        AsymVLM.from_pretrained(tmp_path / "m", load_encoder=True)


def test_dimension_mismatch(tiny_encoder):
    with pytest.raises(ValueError, match="encoder dimension 32 .* does not match the head's dimension 64"):
        AsymVLM(TextHead(dim=64, hidden_dims=(8,)), tiny_encoder)


def test_config_forward_compat_and_errors(tmp_path):
    m = AsymVLM(TextHead(dim=8, hidden_dims=(8,)))
    d = m.save_pretrained(tmp_path / "m")
    cfg_path = d / "asymvlm_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["from_the_future"] = 1
    cfg["head"]["new_head_option"] = True
    cfg_path.write_text(json.dumps(cfg))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        AsymVLM.from_pretrained(d)
    messages = " ".join(str(x.message) for x in w)
    assert "from_the_future" in messages and "new_head_option" in messages
    del cfg["head"], cfg["from_the_future"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ArtefactError, match=r"missing required key\(s\) \['head'\]"):
        AsymVLM.from_pretrained(d)
    cfg["head"] = {"family": "vmf"}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ArtefactError, match="misses required key 'dim'"):
        AsymVLM.from_pretrained(d)
    cfg["head"] = {"dim": 8, "hidden_dims": [16]}  # does not fit the saved weights
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ArtefactError, match="does not fit the head config"):
        AsymVLM.from_pretrained(d)
    cfg["head"] = {"dim": 8, "hidden_dims": [8]}
    cfg_path.write_text(json.dumps(cfg))
    (d / "head.safetensors").write_bytes((d / "head.safetensors").read_bytes()[:50])
    with pytest.raises(ArtefactError, match="corrupt or truncated"):
        AsymVLM.from_pretrained(d)
    with pytest.raises(ArtefactError, match="no saved AsymVLM"):
        AsymVLM.from_pretrained(tmp_path / "nothing")


def test_encoder_with_other_weights_is_detected(tmp_path, make_tiny_open_clip):
    from asymvlm.encoders import load_encoder

    enc_dir, _ = make_tiny_open_clip(tmp_path / "enc", seed=1)
    m = AsymVLM(TextHead(dim=32, hidden_dims=(8,)), load_encoder(str(enc_dir)))
    m.save_pretrained(tmp_path / "m")
    make_tiny_open_clip(tmp_path / "enc", seed=2)  # the checkpoint at that path changes
    with pytest.raises(EncoderMismatchError, match="other weights"):
        AsymVLM.from_pretrained(tmp_path / "m")
    assert AsymVLM.from_pretrained(tmp_path / "m", check_fingerprint=False).encoder is not None
