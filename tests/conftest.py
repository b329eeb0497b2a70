"""Shared fixtures. No network: the Hugging Face stack is forced offline for every test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def unit(*shape, dtype=torch.float64, generator=None):
    """Random unit vectors (..., d)."""
    return torch.nn.functional.normalize(torch.randn(*shape, dtype=dtype, generator=generator), dim=-1)


@pytest.fixture
def make_unit():
    return unit


# ---------------------------------------------------------------------------------------------
# tiny encoders built locally (no network): open_clip from the packaged config, transformers
# CLIP and SigLIP from tiny configs with a locally built word-level tokenizer
# ---------------------------------------------------------------------------------------------
WORDS = [
    "[PAD]",
    "[UNK]",
    "[BOS]",
    "[EOS]",
    "a",
    "an",
    "the",
    "photo",
    "of",
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "triangle",
    "small",
    "big",
    "object",
    "in",
    "top",
    "left",
    "right",
    "bottom",
]


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def build_tiny_hf(kind: str, directory, seed: int = 0):
    """Save a tiny transformers CLIP ('clip') or SigLIP ('siglip') with tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(seed)
    text = dict(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    vision = dict(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    if kind == "clip":
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        processor = SiglipImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(directory)
    _word_tokenizer().save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def build_tiny_open_clip(directory, seed: int = 0):
    """Save the packaged tiny open_clip architecture with seeded random weights as a local dir."""
    import json

    import open_clip

    from asymvlm.encoders import PACKAGE_MODEL_CONFIGS, register_open_clip_configs, save_open_clip_dir

    register_open_clip_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model("asymvlm-tiny-vit")
    cfg = json.loads((PACKAGE_MODEL_CONFIGS / "asymvlm-tiny-vit.json").read_text())
    save_open_clip_dir(model, cfg, directory)
    return directory, model


def random_images(n: int, seed: int = 0, size: int = 40):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_open_clip_dir(tmp_path_factory):
    directory, _ = build_tiny_open_clip(tmp_path_factory.mktemp("oc") / "tiny")
    return directory


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: build_tiny_hf(kind, root / kind) for kind in ("clip", "siglip")}


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A tiny transformers BERT (text only) with the word tokenizer, saved locally."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bert")
    cfg = BertConfig(
        vocab_size=len(WORDS), hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=32, pad_token_id=0,
    )  # fmt: skip
    BertModel(cfg).save_pretrained(d)
    _word_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_encoder(tiny_open_clip_dir):
    from asymvlm.encoders import load_encoder

    return load_encoder(f"open_clip:{tiny_open_clip_dir}", device="cpu")


@pytest.fixture
def make_tiny_hf():
    return build_tiny_hf


@pytest.fixture
def make_tiny_open_clip():
    return build_tiny_open_clip


@pytest.fixture
def make_images():
    return random_images


# ---------------------------------------------------------------------------------------------
# a small toy CLIP standing in for the default one (the default recipe takes ~3 minutes to build)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def quick_toy_cache(tmp_path_factory):
    """An ``ASYMVLM_CACHE`` folder holding the ``--quick`` toy CLIPs of both worlds (built once per
    session), also linked where the default recipes are looked up, so ``open_clip:asymvlm-toy-clip``
    (v2) and ``open_clip:asymvlm-toy-clip-v3`` load them.
    Tests set the variable with ``monkeypatch.setenv("ASYMVLM_CACHE", str(quick_toy_cache))``."""
    from asymvlm.training.demo import QUICK_TOY_STEPS
    from asymvlm.worlds import toyclip

    root = tmp_path_factory.mktemp("asymvlm-cache")
    before = os.environ.get("ASYMVLM_CACHE")
    os.environ["ASYMVLM_CACHE"] = str(root)
    try:
        for world in (2, 3):  # both worlds' toy CLIPs: the --quick recipes, linked as the defaults
            built = toyclip.ensure_toy_clip(
                toyclip.ToyCLIPRecipe(steps=QUICK_TOY_STEPS, world_version=world), progress=False
            )
            default = toyclip.toy_clip_dir(toyclip.ToyCLIPRecipe(world_version=world))
            default.parent.mkdir(parents=True, exist_ok=True)
            default.symlink_to(built, target_is_directory=True)
    finally:
        if before is None:
            del os.environ["ASYMVLM_CACHE"]
        else:
            os.environ["ASYMVLM_CACHE"] = before
    return root


@pytest.fixture(scope="session")
def synthetic_cache():
    """``make(path, n_images, seed=0, dim=16, captions=False)``: an embedding cache of ``n_images``
    random unit image embeddings, each with two captions at noise 0.3 around it (training and
    federated tests on small data); ``captions``: with the strings ``caption <i>``."""
    from asymvlm.cache import write_cache

    def make(path, n_images: int, seed: int = 0, dim: int = 16, captions: bool = False):
        g = torch.Generator().manual_seed(seed)
        img = torch.nn.functional.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
        idx = torch.arange(n_images).repeat_interleave(2)
        txt = torch.nn.functional.normalize(img[idx] + 0.3 * torch.randn(2 * n_images, dim, generator=g), dim=-1)
        strings = [f"caption {i}" for i in range(2 * n_images)] if captions else None
        write_cache(path, img, txt, idx, captions=strings)
        return path

    return make


# ---------------------------------------------------------------------------------------------
# a served model and gallery (tests/serve/test_serve*.py): the tiny open_clip encoder, a head with
# random weights (so concentrations differ between texts), 80 ShapeWorld v2 scenes (32 px)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def serve_assets(tmp_path_factory, tiny_open_clip_dir):
    """``{"model_dir", "gallery_dir", "model", "data"}``: a saved AsymVLM with its encoder and a
    gallery of 80 ShapeWorld v2 scenes (PNG thumbnails, every distinct caption indexed)."""
    from asymvlm.encoders import load_encoder
    from asymvlm.heads import TextHead
    from asymvlm.model import AsymVLM
    from asymvlm.serve.indexing import build_gallery
    from asymvlm.worlds import shapeworld as sw

    root = tmp_path_factory.mktemp("serve")
    encoder = load_encoder(f"open_clip:local-dir:{tiny_open_clip_dir}", device="cpu")
    g = torch.Generator().manual_seed(7)
    head = TextHead(dim=encoder.dim, hidden_dims=(32,), residual=True)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model = AsymVLM(head, encoder, logit_scale=2.0)
    model_dir = model.save_pretrained(root / "model")
    data = sw.generate(80, seed=3, version=2)
    gallery = build_gallery(
        model, data, root / "gallery", thumbnail_format="png", progress=False, source="shapeworld:2"
    )
    return {
        "model_dir": model_dir, "gallery_dir": gallery.path, "model": model, "data": data,
        "args": ["--model", str(model_dir), "--index", str(gallery.path)],  # asymvlm-serve's
    }  # fmt: skip


@pytest.fixture
def key_file(tmp_path):
    """``make(key)``: a private (0600) file holding ``key``, as --api_key_file wants it."""

    def make(key: str):
        path = tmp_path / "secret" / "key.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(key + "\n")
        path.chmod(0o600)
        return path

    return make
