"""asymvlm.retrieval against dense references, FAISS parity, persistence, zero-shot, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from asymvlm.distributions import PowerSpherical, VonMisesFisher
from asymvlm.heads import TextHead
from asymvlm.losses import log_likelihood
from asymvlm.model import AsymVLM
from asymvlm.retrieval import ImageIndex, TextIndex, topk_chunked
from asymvlm.zeroshot import zero_shot_classify

FAMILIES = {"vmf": VonMisesFisher, "ps": PowerSpherical}


def unit(*shape, dtype=torch.float32):
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


def text_dist(family, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    kappa = torch.exp(torch.rand(n, generator=g) * 7)  # 1 .. 1100: concentration matters
    return FAMILIES[family](loc, kappa)


def test_topk_chunked_equals_full_topk():
    scores = torch.randn(5, 1003)
    v, i = topk_chunked(lambda s, e: scores[:, s:e], 1003, 7, 100)
    rv, ri = scores.topk(7, dim=1)
    assert torch.equal(v, rv) and torch.equal(i, ri)


@pytest.mark.parametrize("family", ["vmf", "ps"])
@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_text_to_image_equals_dense_reference(family, backend):
    d, n = 24, 3000
    gallery = unit(n, d)
    q = text_dist(family, 40, d)
    index = ImageIndex(gallery, ids=[f"img{j}" for j in range(n)], chunk_size=512, query_block=7, backend=backend)
    res = index.search(q, k=10)
    dense = log_likelihood(q, gallery)  # (40, n)
    ref_scores, ref_idx = dense.topk(10, dim=1)
    assert torch.equal(res.indices, ref_idx)
    torch.testing.assert_close(res.scores, ref_scores, rtol=1e-5, atol=1e-4)
    assert res.ids[3] == [f"img{j}" for j in ref_idx[3].tolist()]
    torch.testing.assert_close(res.uncertainty, 1 / q.concentration)
    assert (res.scores[:, :-1] >= res.scores[:, 1:]).all()


@pytest.mark.parametrize("family", ["vmf", "ps"])
@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_image_to_text_equals_dense_reference(family, backend):
    d, m = 24, 2500
    q = text_dist(family, m, d, seed=1)
    index = TextIndex.from_distribution(q, chunk_size=300, query_block=4, backend=backend)
    images = unit(30, d)
    res = index.search(images, k=8)
    dense = log_likelihood(q, images).T  # (30, m)
    ref_scores, ref_idx = dense.topk(8, dim=1)
    assert torch.equal(res.indices, ref_idx)
    torch.testing.assert_close(res.scores, ref_scores, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(res.uncertainty, 1 / q.concentration[ref_idx])


def test_concentration_changes_image_to_text_ranking_but_not_text_to_image():
    # two texts with the same direction: the vague one wins for a far image, the sharp one for a near image
    d = 16
    mu = unit(1, d)[0]
    q = VonMisesFisher(torch.stack([mu, mu]), torch.tensor([2.0, 200.0]))
    near = mu.unsqueeze(0)
    far = F.normalize(mu + 3 * unit(1, d)[0], dim=-1).unsqueeze(0)
    index = TextIndex.from_distribution(q, ids=["a photo", "a small red circle in the top left"])
    assert index.search(near, k=1).ids == [["a small red circle in the top left"]]
    assert index.search(far, k=1).ids == [["a photo"]]
    gallery = torch.cat([near, far])
    res = ImageIndex(gallery).search(q, k=2)
    assert res.indices.tolist() == [[0, 1], [0, 1]]  # text -> image ranks by direction only


def test_indexes_persist(tmp_path):
    d = 12
    gallery = unit(100, d)
    idx = ImageIndex(gallery, ids=list(range(1000, 1100)), encoder_fingerprint="abc")
    idx.save(tmp_path / "img")
    back = ImageIndex.load(tmp_path / "img")
    q = text_dist("vmf", 5, d)
    a, b = idx.search(q, k=4), back.search(q, k=4)
    assert torch.equal(a.indices, b.indices) and a.ids == b.ids and back.encoder_fingerprint == "abc"
    tq = text_dist("ps", 50, d)
    tidx = TextIndex.from_distribution(tq, ids=[f"t{i}" for i in range(50)])
    tidx.save(tmp_path / "txt")
    tback = TextIndex.load(tmp_path / "txt")
    images = unit(3, d)
    assert tidx.search(images, k=5).ids == tback.search(images, k=5).ids
    (tmp_path / "img" / "index.safetensors").write_bytes(b"1234")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        ImageIndex.load(tmp_path / "img")


def test_bad_input_is_named():
    d = 8
    gallery = unit(50, d)
    index = ImageIndex(gallery)
    with pytest.raises(ValueError, match="query dimension 9 does not match the index dimension 8"):
        index.search(text_dist("vmf", 2, 9), k=1)
    with pytest.raises(ValueError, match="k=51 is larger than the gallery"):
        index.search(text_dist("vmf", 2, d), k=51)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(text_dist("vmf", 2, d), k=0)
    with pytest.raises(ValueError, match="need model="):
        index.search(unit(2, d), k=1)
    bad = gallery.clone()
    bad[7, 0] = float("nan")
    with pytest.raises(ValueError, match="row 7 contains NaN"):
        ImageIndex(bad)
    with pytest.raises(ValueError, match="row 3 has norm 2"):
        ImageIndex(torch.cat([gallery[:3], 2 * gallery[3:4]]))
    big = unit(70000, d)
    big[66000] *= 3
    with pytest.raises(ValueError, match="row 66000 has norm 3"):  # rows counted over the whole gallery
        ImageIndex(big)
    with pytest.raises(ValueError, match="gallery is empty"):
        ImageIndex(torch.empty(0, d))
    with pytest.raises(ValueError, match="got 3 ids for 50"):
        ImageIndex(gallery, ids=[1, 2, 3])
    tindex = TextIndex.from_distribution(text_dist("vmf", 10, d))
    with pytest.raises(ValueError, match="image dimension 5 does not match the index dimension 8"):
        tindex.search(unit(2, 5), k=1)
    with pytest.raises(ValueError, match="non-empty"):
        tindex.search(torch.empty(0, d), k=1)
    inf = unit(2, d)
    inf[1, 2] = float("inf")
    with pytest.raises(ValueError, match="row 1 contains NaN or inf"):
        tindex.search(inf, k=1)
    with pytest.raises(ValueError, match="unit vectors"):
        TextIndex(2 * unit(3, d), torch.ones(3), "vmf")


def test_strings_through_a_model_and_encoder_mismatch(tiny_encoder, make_images, tmp_path, make_tiny_open_clip):
    from asymvlm.encoders import load_encoder

    torch.manual_seed(0)
    model = AsymVLM(TextHead(dim=32, hidden_dims=(32,), residual=True, init_concentration=30.0), tiny_encoder)
    images = model.encode_image(make_images(20))
    index = ImageIndex(images, encoder_fingerprint=tiny_encoder.fingerprint)
    res = index.search(["a red circle", "a blue square"], k=3, model=model)
    ref = log_likelihood(model.encode_text(["a red circle", "a blue square"]), images).topk(3, dim=1)
    assert torch.equal(res.indices, ref.indices)
    other_dir, _ = make_tiny_open_clip(tmp_path / "o", seed=5)
    other = AsymVLM(TextHead(dim=32, hidden_dims=(8,)), load_encoder(str(other_dir)))
    with pytest.raises(ValueError, match="another encoder"):
        index.search(["a red circle"], k=1, model=other)
    with pytest.raises(ValueError, match="no queries"):
        index.search([], k=1, model=model)
    # image -> text from strings and raw images
    captions = ["a red circle", "a blue square", "an object", "the photo of a big green triangle"]
    tindex = TextIndex.from_texts(model, captions)
    res = tindex.search(make_images(2), k=2, model=model)
    dense = model.log_likelihood(captions, model.encode_image(make_images(2))).T
    assert torch.equal(res.indices, dense.topk(2, dim=1).indices)
    assert res.ids == [[captions[j] for j in row] for row in dense.topk(2, dim=1).indices.tolist()]


def test_zero_shot_with_abstention():
    torch.manual_seed(0)
    d = 16
    head = TextHead(dim=d, family="vmf", hidden_dims=(8,), residual=True, init_concentration=40.0)
    model = AsymVLM(head, logit_scale=math.log(2.0))
    classes = unit(3, d)
    images = torch.cat([F.normalize(classes + 0.1 * unit(3, d), dim=-1), unit(4, d)])  # 3 clear + 4 random
    res = zero_shot_classify(model, images, classes, class_names=["cat", "dog", "car"])
    dense = model.log_likelihood(classes, images).T
    assert torch.equal(res.best, dense.argmax(1)) and res.best[:3].tolist() == [0, 1, 2]
    torch.testing.assert_close(res.log_likelihood, dense.max(1).values)
    torch.testing.assert_close(res.probabilities, torch.softmax(2.0 * dense, dim=1))
    assert not res.abstained.any() and res.labels[:3] == ["cat", "dog", "car"]
    # likelihood threshold between the clear and the random images: abstain on the random ones
    thr = float((res.log_likelihood[:3].min() + res.log_likelihood[3:].max()) / 2)
    out = zero_shot_classify(model, images, classes, class_names=["cat", "dog", "car"], threshold=thr)
    assert out.abstained.tolist() == [False] * 3 + [True] * 4
    assert out.labels[3:] == ["unknown"] * 4 and out.predictions[3:].tolist() == [-1] * 4
    for criterion, thr in [("probability", 0.99), ("entropy", 1e-3), ("uncertainty", 0.0)]:
        out = zero_shot_classify(model, images, classes, criterion=criterion, threshold=thr)
        assert out.abstained.dtype == torch.bool
    assert zero_shot_classify(model, images, classes, criterion="uncertainty", threshold=0.0).abstained.all()
    with pytest.raises(ValueError, match="unknown criterion"):
        zero_shot_classify(model, images, classes, criterion="vibes")
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        zero_shot_classify(model, images, classes, class_names=["a", "b"])


def test_zero_shot_prompt_ensembles(tiny_encoder, make_images):
    torch.manual_seed(0)
    model = AsymVLM(TextHead(dim=32, hidden_dims=(8,), residual=True), tiny_encoder)
    prompts = {"circle": ["a circle", "a photo of a circle"], "square": ["a square", "a photo of a square"]}
    res = zero_shot_classify(model, make_images(3), prompts)
    ens = torch.stack([F.normalize(tiny_encoder.encode_text(p).mean(0), dim=-1) for p in prompts.values()])
    ref = zero_shot_classify(model, model.encode_image(make_images(3)), ens, class_names=list(prompts))
    assert res.labels == ref.labels and torch.equal(res.best, ref.best)
    with pytest.raises(ValueError, match="non-empty list of prompts"):
        zero_shot_classify(model, make_images(1), [["a circle"], []])
