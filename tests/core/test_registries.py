"""The registries of the core (families, vMF normalisers, abstention criteria, dataset specs) and
of federated data and methods (partitioners, personalisation and clustering methods): declared
parameters, listings, strict options and parity with the direct calls."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from asymvlm.distributions import PowerSpherical, VonMisesFisher
from asymvlm.errors import ConfigError, DatasetLayoutError
from asymvlm.federated.clustered import CLUSTERERS
from asymvlm.federated.partition import (
    PARTITIONER_REGISTRY,
    dirichlet_label_skew,
    domain_skew,
    iid,
    partition,
    quantity_skew,
)
from asymvlm.federated.personal import PERSONALIZERS
from asymvlm.heads import FAMILY_REGISTRY, HeadConfig, TextHead, family_class, family_of, make_distribution
from asymvlm.losses import VMF_NORMALIZER_REGISTRY, AsymVLMLoss, log_likelihood
from asymvlm.model import AsymVLM
from asymvlm.retrieval import TextIndex
from asymvlm.special import vmf_log_normalizer, vmf_log_normalizer_approx
from asymvlm.worlds.data import (
    DATASET_SPEC_REGISTRY,
    load_coco_2017,
    load_coco_karpathy,
    load_dataset_spec,
    load_flickr30k_karpathy,
    load_image_folder,
)
from asymvlm.zeroshot import ABSTAIN_REGISTRY, zero_shot_classify

REGISTRIES = {
    "family": (FAMILY_REGISTRY, {"vmf", "ps"}),
    "vmf_normalizer": (VMF_NORMALIZER_REGISTRY, {"exact", "approx"}),
    "criterion": (ABSTAIN_REGISTRY, {"likelihood", "uncertainty", "probability", "entropy", "p_correct"}),
    "dataset spec": (DATASET_SPEC_REGISTRY, {"imagefolder", "coco-karpathy", "coco2017", "flickr30k"}),
    "partition": (
        PARTITIONER_REGISTRY,
        {
            "iid",
            "dirichlet",
            "quantity",
            "domain",
            "pathological",
            "powerlaw",
            "embedding",
            "feature_skew",
            "concept_shift",
            "joint",
        },
    ),
    "personalization method": (
        PERSONALIZERS,
        {"none", "local_ft", "fedper", "lg_fedavg", "fedsa_lora", "fedrep", "ditto", "pfedme", "kappa_route"},
    ),
    "clustering method": (CLUSTERERS, {"ifca", "cfl", "fedem", "mocha"}),
}


def unit(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


# ----------------------------------------------------------------------------------------------
# every registry: declarations and listings
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_every_entry_declares_help_reference_and_parameters(kind):
    registry, names = REGISTRIES[kind]
    assert registry.kind == kind and set(registry) == names
    for name, entry in registry.items():
        assert entry.name == name
        assert entry.help and len(entry.help.splitlines()) == 1, name
        assert entry.reference, name
        for p in entry.params:
            assert p.help and len(p.help.splitlines()) == 1, (name, p.name)
            assert p.validate(p.default, "test") == p.default  # every default passes its own check


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_describe_lists_every_entry_and_parameter(kind):
    registry, _ = REGISTRIES[kind]
    text = registry.describe()
    lines = text.splitlines()
    for name, entry in registry.items():
        head = next(i for i, line in enumerate(lines) if line.startswith(f"{name}: "))
        assert entry.help in lines[head] and entry.reference in lines[head]
        body = lines[head + 1 : head + 1 + max(1, len(entry.params))]
        if entry.params:
            assert [line.strip() for line in body] == [p.describe() for p in entry.params]
        else:
            assert body == ["    (no parameters)"]


@pytest.mark.parametrize("kind", list(REGISTRIES))
def test_unknown_entry_and_unknown_option_are_config_errors(kind):
    registry, names = REGISTRIES[kind]
    with pytest.raises(ConfigError, match=rf"unknown {kind} 'nope'; choose one of {sorted(names)}".replace("[", r"\[")):
        registry.entry("nope")
    for name, entry in registry.items():
        valid = ", ".join(entry.param_names) or "none"
        with pytest.raises(ConfigError) as err:
            registry.resolve(name, {"bogus_key": 1})
        assert str(err.value) == f"unknown option 'bogus_key' for {kind} '{name}'; valid options: {valid}"


# ----------------------------------------------------------------------------------------------
# 1. distribution families
# ----------------------------------------------------------------------------------------------
def test_families_build_the_same_distributions_as_the_classes():
    loc, kappa = unit(5, 12, dtype=torch.float64), torch.tensor([0.5, 3.0, 40.0, 300.0, 1e4], dtype=torch.float64)
    x = unit(7, 12, dtype=torch.float64, seed=1)
    for name, cls in (("vmf", VonMisesFisher), ("ps", PowerSpherical)):
        assert family_class(name) is cls and FAMILY_REGISTRY[name].extra["cls"] is cls
        q = make_distribution(name, loc, kappa)
        ref = cls(loc, kappa)
        assert type(q) is cls and family_of(q) == name
        assert torch.equal(q.log_normalizer, ref.log_normalizer)
        assert torch.equal(q.pairwise_log_prob(x), ref.pairwise_log_prob(x))
        assert torch.equal(q.entropy(), ref.entropy())
        built = FAMILY_REGISTRY.build(name, validate_args=False)(loc, kappa)
        assert torch.equal(built.log_prob(x[:5]), ref.log_prob(x[:5]))
    assert family_of(torch.distributions.Normal(0.0, 1.0)) is None
    assert "2006.04437" in FAMILY_REGISTRY["ps"].reference and "banerjee05a" in FAMILY_REGISTRY["vmf"].reference


def test_family_options_are_checked_and_used():
    loc, kappa = 2 * unit(2, 4), torch.ones(2)  # loc not unit
    with pytest.raises(ValueError, match="must be unit vectors"):
        make_distribution("vmf", loc, kappa, validate_args=True)
    assert make_distribution("vmf", loc, kappa, validate_args=False).batch_shape == (2,)
    with pytest.raises(ConfigError, match="family 'ps': validate_args must be true or false, got 'yes'"):
        make_distribution("ps", unit(2, 4), kappa, validate_args="yes")
    with pytest.raises(ConfigError, match="unknown option 'validate' for family 'vmf'; valid options: validate_args"):
        make_distribution("vmf", unit(2, 4), kappa, validate=False)
    with pytest.raises(ConfigError, match=r"unknown family 'gauss'; choose one of \['ps', 'vmf'\]"):
        HeadConfig(family="gauss")
    with pytest.raises(ConfigError, match="unknown family 'gauss'"):
        TextIndex(unit(2, 4), kappa, "gauss")


@pytest.mark.parametrize("family", ["vmf", "ps"])
def test_head_distribution_equals_the_direct_class(family):
    torch.manual_seed(0)
    head = TextHead(dim=16, family=family, hidden_dims=(8,))
    text = unit(6, 16)
    q = head(text)
    loc, kappa = head.loc_concentration(text)
    ref = family_class(family)(loc, kappa, validate_args=False)
    assert type(q) is type(ref)
    assert torch.equal(q.loc, ref.loc) and torch.equal(q.concentration, ref.concentration)
    assert torch.equal(q.pairwise_log_prob(unit(3, 16, seed=2)), ref.pairwise_log_prob(unit(3, 16, seed=2)))


# ----------------------------------------------------------------------------------------------
# 2. vMF normalisers
# ----------------------------------------------------------------------------------------------
def test_vmf_normalizers_equal_the_direct_functions():
    assert VMF_NORMALIZER_REGISTRY.build("exact") is vmf_log_normalizer is VMF_NORMALIZER_REGISTRY["exact"].extra["fn"]
    assert (
        VMF_NORMALIZER_REGISTRY.build("approx")
        is vmf_log_normalizer_approx
        is VMF_NORMALIZER_REGISTRY["approx"].extra["fn"]
    )
    assert "2103.15718" in VMF_NORMALIZER_REGISTRY["approx"].reference
    d = 64
    q = VonMisesFisher(unit(5, d, dtype=torch.float64), torch.tensor([0.1, 2.0, 30.0, 200.0, 900.0]).double())
    x = unit(9, d, dtype=torch.float64, seed=3)
    exact = log_likelihood(q, x, vmf_normalizer="exact")
    approx = log_likelihood(q, x, vmf_normalizer="approx")
    assert torch.equal(exact, q.pairwise_log_prob(x, vmf_log_normalizer(d, q.concentration)))
    assert torch.equal(approx, q.pairwise_log_prob(x, vmf_log_normalizer_approx(d, q.concentration)))
    assert not torch.allclose(exact, approx)  # the approximation drops a constant: the choice matters
    # Power Spherical is exact in closed form whatever the choice
    ps = PowerSpherical(q.loc, q.concentration)
    assert torch.equal(log_likelihood(ps, x, vmf_normalizer="approx"), ps.pairwise_log_prob(x))


def test_vmf_normalizer_errors():
    q = VonMisesFisher(unit(3, 8), torch.ones(3))
    for bad in ("fast", 3, None):
        with pytest.raises(ConfigError, match=r"unknown vmf_normalizer .*; choose one of \['approx', 'exact'\]"):
            log_likelihood(q, unit(4, 8), vmf_normalizer=bad)
    with pytest.raises(ConfigError, match="unknown vmf_normalizer 'fast'"):
        AsymVLMLoss(vmf_normalizer="fast")
    with pytest.raises(ConfigError, match="unknown option 'terms' for vmf_normalizer 'exact'; valid options: none"):
        VMF_NORMALIZER_REGISTRY.build("exact", terms=10)


# ----------------------------------------------------------------------------------------------
# 3. abstention criteria
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def zero_shot_setup():
    torch.manual_seed(0)
    d = 16
    head = TextHead(dim=d, family="vmf", hidden_dims=(8,), residual=True, init_concentration=40.0)
    with torch.no_grad():  # concentrations that differ per class
        head.mlp[-1].weight.normal_(0, 0.5)
    model = AsymVLM(head, logit_scale=math.log(2.0))
    classes = unit(4, d)
    images = torch.cat([F.normalize(classes + 0.2 * unit(4, d, seed=1), dim=-1), unit(8, d, seed=2)])
    return model, images, classes


def test_abstention_equals_the_direct_rule(zero_shot_setup):
    model, images, classes = zero_shot_setup
    from asymvlm.confidence import zero_shot_features
    from asymvlm.zeroshot import fit_zero_shot_calibrator

    # a calibrator fitted on the first 8 images' true classes (the last 8 are unit noise: class 0 here)
    labels = torch.cat([torch.arange(4), torch.zeros(8, dtype=torch.int64)])
    cal = fit_zero_shot_calibrator(model, images, labels, classes)
    base = zero_shot_classify(model, images, classes, calibrator=cal)
    assert not base.abstained.any()
    p = base.probabilities
    assert torch.allclose(base.p_correct, cal.predict(zero_shot_features(base.uncertainty, p)).to(p.dtype))
    stats = {
        "likelihood": (base.log_likelihood, "below"),
        "uncertainty": (base.uncertainty, "above"),
        "probability": (p.max(-1).values, "below"),
        "entropy": (-(p * torch.log(p.clamp_min(1e-30))).sum(-1), "above"),
        "p_correct": (base.p_correct, "below"),
    }
    assert set(ABSTAIN_REGISTRY) == set(stats)
    for name, (stat, direction) in stats.items():
        assert ABSTAIN_REGISTRY[name].extra["direction"] == direction
        thr = float(stat.median())
        expected = stat < thr if direction == "below" else stat > thr
        assert 0 < int(expected.sum()) < len(stat), name  # the threshold splits the images
        out = zero_shot_classify(model, images, classes, criterion=name, threshold=thr, calibrator=cal)
        assert torch.equal(out.abstained, expected), name
        assert torch.equal(out.predictions, torch.where(expected, -1, base.best))
        assert out.labels == ["unknown" if a else str(b) for a, b in zip(expected.tolist(), base.best.tolist())]
        rule = ABSTAIN_REGISTRY.build(name, threshold=thr)
        assert torch.equal(rule(base.log_likelihood, base.uncertainty, p, base.p_correct), expected)
        assert torch.equal(
            ABSTAIN_REGISTRY[name].extra["statistic"](base.log_likelihood, base.uncertainty, p, base.p_correct), stat
        )
        assert not ABSTAIN_REGISTRY.build(name)(base.log_likelihood, base.uncertainty, p).any()
    # without a calibrator the p_correct criterion is one clear error
    with pytest.raises(ConfigError, match="p_correct criterion needs a calibrated probability"):
        zero_shot_classify(model, images, classes, criterion="p_correct", threshold=0.5)
    assert base.to_dict()["images"][0]["p_correct"] == pytest.approx(float(base.p_correct[0]))


def test_abstention_threshold_is_checked(zero_shot_setup):
    model, images, classes = zero_shot_setup
    for criterion, bad, message in [
        ("probability", 1.5, r"criterion 'probability': threshold must be in \[0.0, 1.0\], got 1.5"),
        ("probability", "0.5", "criterion 'probability': threshold must be a number, got '0.5'"),
        ("entropy", -0.1, "criterion 'entropy': threshold must be >= 0 and finite, got -0.1"),
        ("uncertainty", math.inf, "criterion 'uncertainty': threshold must be >= 0 and finite, got inf"),
        ("likelihood", math.nan, r"criterion 'likelihood': threshold must be a number \(not NaN\), got nan"),
        ("likelihood", True, "criterion 'likelihood': threshold must be a number, got True"),
    ]:
        with pytest.raises(ConfigError, match=message):
            zero_shot_classify(model, images, classes, criterion=criterion, threshold=bad)
    with pytest.raises(ConfigError, match=r"unknown criterion 'vibes'; choose one of \['entropy', 'likelihood'"):
        zero_shot_classify(model, images, classes, criterion="vibes")
    with pytest.raises(ConfigError, match="unknown option 'margin' for criterion 'entropy'; valid options: threshold"):
        ABSTAIN_REGISTRY.build("entropy", margin=0.1)
    # boundaries and ints are accepted (an int widens to float)
    res = zero_shot_classify(model, images, classes, criterion="probability", threshold=1)
    assert torch.equal(res.abstained, res.probabilities.max(-1).values < 1.0)
    assert not zero_shot_classify(model, images, classes, criterion="probability", threshold=0).abstained.any()


# ----------------------------------------------------------------------------------------------
# 4. dataset specs
# ----------------------------------------------------------------------------------------------
def _img(path, colour="red"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 4), colour).save(path)


@pytest.fixture
def datasets_on_disk(tmp_path):
    # image folder
    folder = tmp_path / "folder"
    _img(folder / "a.png")
    _img(folder / "b.png", "blue")
    lines = [{"file_name": "a.png", "text": "red"}, {"file_name": "b.png", "captions": ["blue", "navy"]}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    # Karpathy COCO (one image per split)
    coco = tmp_path / "coco"
    images = []
    for i, split in enumerate(("train", "restval", "val", "test")):
        sub = "train2014" if split == "train" else "val2014"
        _img(coco / sub / f"{i}.jpg")
        images.append(
            {"filepath": sub, "filename": f"{i}.jpg", "split": split, "cocoid": i, "sentences": [{"raw": split}]}
        )
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    # Karpathy Flickr30k
    flickr = tmp_path / "flickr"
    _img(flickr / "1.jpg")
    _img(flickr / "2.jpg")
    fl = [
        {"filename": "1.jpg", "split": "test", "imgid": 1, "sentences": [{"raw": "one"}]},
        {"filename": "2.jpg", "split": "val", "imgid": 2, "sentences": [{"raw": "two"}]},
    ]
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": fl}))
    # COCO 2017
    c17 = tmp_path / "val2017"
    _img(c17 / "7.jpg")
    ann = {"images": [{"id": 7, "file_name": "7.jpg"}], "annotations": [{"image_id": 7, "caption": "seven"}]}
    (tmp_path / "captions_val2017.json").write_text(json.dumps(ann))
    return tmp_path


def _rows(ds):
    return [(r["image_id"], r["captions"], r["file_name"], r["image"].size) for r in ds]


def test_dataset_specs_equal_the_direct_loaders(datasets_on_disk):
    t = datasets_on_disk
    coco = (t / "dataset_coco.json", t / "coco")
    c17 = (t / "captions_val2017.json", t / "val2017")
    fl = (t / "dataset_flickr30k.json", t / "flickr")
    cases = [
        (f"imagefolder:{t / 'folder'}", lambda: load_image_folder(t / "folder")),
        (f"coco-karpathy:{coco[0]}:{coco[1]}", lambda: load_coco_karpathy(*coco)),
        (f"coco2017:{c17[0]}:{c17[1]}", lambda: load_coco_2017(*c17)),
        (f"flickr30k:{fl[0]}:{fl[1]}", lambda: load_flickr30k_karpathy(*fl)),
        (f"flickr30k:{fl[0]}:{fl[1]}:val", lambda: load_flickr30k_karpathy(*fl, "val")),
    ]
    for split in ("train", "restval", "val", "test"):
        cases.append(
            (
                f"coco-karpathy:{coco[0]}:{coco[1]}:{split}",
                lambda split=split: load_coco_karpathy(*coco, split),
            )
        )
    seen = set()
    for spec, direct in cases:
        got = _rows(load_dataset_spec(spec))
        assert got == _rows(direct()) and got, spec
        seen.add(repr(got))
    assert len(seen) == len(cases) - 1  # all differ but the default split (test) and the explicit test split
    assert _rows(load_dataset_spec(f"coco-karpathy:{coco[0]}:{coco[1]}"))[0][1] == ["test"]  # default split


def test_dataset_spec_options_reach_the_loader(datasets_on_disk):
    t = datasets_on_disk
    (t / "folder" / "b.png").unlink()
    with pytest.raises(DatasetLayoutError, match="1 image file"):
        load_dataset_spec(f"imagefolder:{t / 'folder'}")
    assert len(load_dataset_spec(f"imagefolder:{t / 'folder'}", check_files=False)) == 2


def test_dataset_spec_errors_name_the_kinds_and_the_form():
    forms = (
        "imagefolder:<root>, coco-karpathy:<json>:<root>[:split], coco2017:<json>:<dir>, flickr30k:<json>:<dir>[:split]"
    )
    with pytest.raises(ConfigError) as err:
        load_dataset_spec("coco:/x")
    assert str(err.value) == f"cannot parse dataset spec 'coco:/x': unknown kind 'coco'; valid kinds: {forms}"
    for spec, expected in [
        ("imagefolder", "imagefolder expects imagefolder:<root> (1 field, got 0)"),
        ("imagefolder:/a:/b", "imagefolder expects imagefolder:<root> (1 field, got 2)"),
        ("coco-karpathy:/a", "coco-karpathy expects coco-karpathy:<json>:<root>[:split] (2 to 3 fields, got 1)"),
        ("coco2017:/a:/b:test", "coco2017 expects coco2017:<json>:<dir> (2 fields, got 3)"),
        ("flickr30k:/a:/b:test:x", "flickr30k expects flickr30k:<json>:<dir>[:split] (2 to 3 fields, got 4)"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_dataset_spec(spec)
        assert str(err.value) == f"cannot parse dataset spec '{spec}': {expected}; valid kinds: {forms}"
    with pytest.raises(ConfigError, match=r"dataset spec 'coco-karpathy': split='dev' is not one of \['train'"):
        load_dataset_spec("coco-karpathy:/a:/b:dev")
    with pytest.raises(ConfigError, match="dataset spec 'coco2017': annotations_json must be a non-empty path"):
        load_dataset_spec("coco2017::/b")
    with pytest.raises(ConfigError, match="dataset spec 'imagefolder': check_files must be true or false"):
        load_dataset_spec("imagefolder:/a", check_files="no")
    with pytest.raises(ConfigError, match="unknown option 'checkfiles' for dataset spec 'imagefolder'"):
        load_dataset_spec("imagefolder:/a", checkfiles=False)
    with pytest.raises(ConfigError, match=r"\['root'\] are fields of the spec string \(imagefolder:<root>\)"):
        load_dataset_spec("imagefolder:/a", root="/b")
    with pytest.raises(ConfigError, match="must be a string"):
        load_dataset_spec(None)
    for name, entry in DATASET_SPEC_REGISTRY.items():
        assert entry.extra["form"].startswith(name + ":")
        assert 1 <= entry.extra["required"] <= entry.extra["fields"] < len(entry.params)
        assert entry.param_names[entry.extra["fields"] :] == ("check_files",)


# ----------------------------------------------------------------------------------------------
# 5. partitioners
# ----------------------------------------------------------------------------------------------
class Rows:
    def __init__(self, **columns):
        self.columns = {k: np.asarray(v) for k, v in columns.items()}

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, name):
        return self.columns[name]


LABELS = np.repeat(np.arange(5), 40)
DOMAINS = np.tile(np.array(["a", "b", "c"]), 70)[:200]


def same(a, b):
    return len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


def test_partitioners_through_the_registry_equal_the_direct_calls():
    ds = Rows(label=LABELS, domain=DOMAINS)
    options = {
        "iid": {"min_size": 2},
        "dirichlet": {"column": "label", "alpha": 0.1, "min_size": 5, "max_tries": 200},
        "quantity": {"alpha": 0.3, "min_size": 3},
        "domain": {"column": "domain", "min_size": 2},
    }
    for seed in (0, 3):
        direct = {
            "iid": iid(200, 7, seed, min_size=2),
            "dirichlet": dirichlet_label_skew(LABELS, 7, 0.1, seed=seed, min_size=5, max_tries=200),
            "quantity": quantity_skew(200, 7, 0.3, seed=seed, min_size=3),
            "domain": domain_skew(DOMAINS, 7, seed=seed, min_size=2),
        }
        for name, opts in options.items():
            assert same(partition(ds, 7, name, seed=seed, **opts), direct[name]), (name, seed)
            assert same(PARTITIONER_REGISTRY.build(name, **opts)(ds, 7, seed), direct[name]), (name, seed)
    # defaults: partition() with no options is the partitioner with its own defaults
    assert same(partition(ds, 7, "quantity", seed=2), quantity_skew(200, 7, 0.5, 2))
    assert not same(partition(ds, 7, "iid", seed=0), partition(ds, 7, "iid", seed=1))  # the seed is used
    assert {k: e.extra["fn"].__name__ for k, e in PARTITIONER_REGISTRY.items()} == {
        "iid": "iid",
        "dirichlet": "dirichlet_label_skew",
        "quantity": "quantity_skew",
        "domain": "domain_skew",
        "pathological": "pathological_label_skew",
        "powerlaw": "powerlaw_quantity_skew",
        "embedding": "embedding_skew",
        "feature_skew": "feature_skew",
        "concept_shift": "concept_shift",
        "joint": "joint_skew",
    }


def test_partitioner_options_are_strict_and_checked():
    ds = Rows(label=LABELS, domain=DOMAINS)
    with pytest.raises(ConfigError) as err:
        partition(ds, 4, "iid", alpha=0.3)
    assert str(err.value) == "unknown option 'alpha' for partition 'iid'; valid options: min_size"
    with pytest.raises(
        ConfigError, match="unknown option 'column' for partition 'quantity'; valid options: alpha, min_size"
    ):
        partition(ds, 4, "quantity", column="label")
    with pytest.raises(
        ConfigError, match="unknown option 'max_tries' for partition 'domain'; valid options: column, min_size"
    ):
        partition(ds, 4, "domain", column="domain", max_tries=3)
    for method, options, message in [
        (
            "dirichlet",
            {"column": "label", "alpha": 0.0},
            "partition 'dirichlet': alpha must be > 0 and finite, got 0.0",
        ),
        ("quantity", {"alpha": -1}, "partition 'quantity': alpha must be > 0 and finite, got -1.0"),
        ("quantity", {"alpha": math.inf}, "partition 'quantity': alpha must be > 0 and finite, got inf"),
        ("iid", {"min_size": 0}, "partition 'iid': min_size must be >= 1, got 0"),
        ("iid", {"min_size": 2.0}, r"partition 'iid': min_size must be an integer, got 2.0 \(write 2\)"),
        ("dirichlet", {"column": "label", "max_tries": 0}, "partition 'dirichlet': max_tries must be >= 1, got 0"),
        ("domain", {"column": 3}, "partition 'domain': column must be a string, got 3"),
        ("dirichlet", {"alpha": "0.5", "column": "label"}, "partition 'dirichlet': alpha must be a number, got '0.5'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            partition(ds, 4, method, **options)
    for method in ("dirichlet", "domain"):
        with pytest.raises(ConfigError, match=f"partition '{method}' needs a column"):
            partition(ds, 4, method)
    with pytest.raises(
        ConfigError, match=r"unknown partition 'random'; choose one of \['concept_shift', 'dirichlet', 'domain'"
    ):
        partition(ds, 4, "random")
    with pytest.raises(ConfigError, match="num_clients must be >= 1, got 0"):
        partition(ds, 0, "iid")
    for entry in PARTITIONER_REGISTRY.values():  # call arguments are not options
        assert not {"seed", "num_clients", "dataset"} & set(entry.param_names)
        assert "min_size" in entry.param_names
