"""A gallery that knows which images each caption is true of (ShapeWorld's consistency): the truth
relation in the gallery format, and the service calibrating p_correct on it instead of on who
carries the caption. References: ShapeWorld's consistency matrix, fit_gallery_calibrator."""

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
from safetensors.torch import load_file, save_file  # noqa: E402

from asymvlm.confidence import fit_gallery_calibrator  # noqa: E402
from asymvlm.errors import ArtefactError  # noqa: E402
from asymvlm.model import AsymVLM  # noqa: E402
from asymvlm.serve.gallery import TRUTH_LABEL, Gallery  # noqa: E402
from asymvlm.serve.indexing import (  # noqa: E402
    build_gallery,
    collection_truth,
    load_image_collection,
    write_gallery,
)
from asymvlm.serve.service import RetrievalService, TextQuery  # noqa: E402
from asymvlm.worlds import shapeworld as sw  # noqa: E402


def served(batch):
    """The service's answers (schema types) as the JSON the API serves them."""
    return [[a.model_dump(exclude_unset=True) for a in answers] for answers in batch]


def rows_of(pair):
    offsets, rows = pair
    return [rows[offsets[c] : offsets[c + 1]].tolist() for c in range(len(offsets) - 1)]


def test_caption_truth_is_the_consistency_matrix():
    for version in (2, 3):
        w = sw.generate_arrays(40, seed=1, version=version)
        truth = sw.caption_truth(w)
        texts = list(dict.fromkeys(c for row in w.captions for c in row))
        spec_of = {c: s for caps, specs in zip(w.captions, w.specs) for c, s in zip(caps, specs)}
        cm = sw.consistency_matrix(np.stack([spec_of[c] for c in texts]), w.objects)
        assert [r.tolist() for r in truth(texts)] == [np.flatnonzero(row).tolist() for row in cm]
        # every caption is true of the images that carry it
        for i, caps in enumerate(w.captions):
            for c, rows in zip(caps, truth(caps)):
                assert i in rows.tolist(), c
        with pytest.raises(ValueError, match="not this world's"):
            truth(["a purple elephant"])


def test_truth_round_trips_and_corruption_is_refused(tmp_path):
    emb = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    caps = ["a", "b", "c"]
    kw = dict(captions=caps, caption_embeddings=emb[:3], caption_owners=[[0], [5], [1]])
    g = write_gallery(tmp_path / "g", emb, caption_truth=[[0, 2], [5, 4], [1]], truth_label="satisfies", **kw)
    assert rows_of(g.caption_truth) == [[0, 2], [4, 5], [1]] and g.meta["truth"] == "satisfies"
    assert rows_of(Gallery.open(tmp_path / "g").caption_truth) == [[0, 2], [4, 5], [1]]
    assert write_gallery(tmp_path / "h", emb, **kw).caption_truth is None
    with pytest.raises(Exception, match="go together"):
        write_gallery(tmp_path / "x", emb, caption_truth=[[0], [1], [2]], **kw)
    path = tmp_path / "g" / "captions.safetensors"
    t = dict(load_file(path))
    save_file({**t, "truth_rows": torch.tensor([0, 2, 9, 5, 1])}, path)
    with pytest.raises(ArtefactError, match="truth row 9 .* outside the gallery's 6 images"):
        Gallery.open(tmp_path / "g")
    save_file({k: v for k, v in t.items() if not k.startswith("truth")}, path)
    with pytest.raises(ArtefactError, match="'truth' and the truth rows .* go together"):
        Gallery.open(tmp_path / "g")


@pytest.fixture(scope="module")
def truth_gallery(tmp_path_factory, serve_assets):
    """80 ShapeWorld v2 scenes as asymvlm-index build --images shapeworld:2 makes them, with their truth."""
    model = AsymVLM.from_pretrained(serve_assets["model_dir"])
    data = load_image_collection("shapeworld:2", num_images=80, seed=3)
    truth, label = collection_truth("shapeworld:2", num_images=80, seed=3)
    assert label == TRUTH_LABEL and collection_truth("imagefolder:/nowhere") == (None, None)
    root = tmp_path_factory.mktemp("truth") / "g"
    return (
        model,
        data,
        build_gallery(model, data, root, thumbnail_format="png", truth=truth, truth_label=label, progress=False),
    )


def test_the_built_gallery_records_the_truth(truth_gallery):
    _, data, g = truth_gallery
    w = sw.generate_arrays(80, seed=3, version=2, visual_styles=sw.VISUAL_STYLES)
    assert [c for row in w.captions for c in row] == [c for row in data["captions"] for c in row]  # the same world
    expected = [r.tolist() for r in sw.caption_truth(w)(g.captions)]
    assert rows_of(g.caption_truth) == expected
    # true of at least the images that carry it, and of more for vague captions
    for owners, true_of in zip(rows_of(g.caption_owners), expected):
        assert set(owners) <= set(true_of)
    assert sum(map(len, expected)) > sum(map(len, rows_of(g.caption_owners)))


def test_the_service_calibrates_on_the_truth(truth_gallery):
    model, _, g = truth_gallery
    with torch.no_grad():
        svc = RetrievalService(model, g, abstain="auto")
        cal = fit_gallery_calibrator(model, g.index, g.caption_embeddings, *g.caption_truth, seed=0, label=TRUTH_LABEL)
        identity = fit_gallery_calibrator(model, g.index, g.caption_embeddings, *g.caption_owners, seed=0)
        assert svc.calibration["label"] == TRUTH_LABEL and svc.calibration["source"] == "gallery captions"
        assert svc.calibrator.weights() == pytest.approx(cal.weights())
        assert svc.calibration["base_rate"] == pytest.approx(cal.info["base_rate"])
        assert cal.info["base_rate"] > identity.info["base_rate"]  # satisfying is more often right than carrying
        [answers] = served(svc.search_text([TextQuery(["a shape", "a red circle"], k=3)]))
    assert all(a["confidence"]["calibrated"] for a in answers)
    assert svc.info()["calibration"]["label"] == TRUTH_LABEL
