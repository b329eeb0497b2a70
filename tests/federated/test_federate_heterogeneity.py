"""``asymvlm-federate``'s partitioner options, its embedding partition over the cache's own image
embeddings, and the heterogeneity report it writes (issue 28, first increment).

References: the split of ``asymvlm-federate`` equals :func:`asymvlm.federated.partition.partition`
called directly with the same options; the report it writes equals
:func:`asymvlm.federated.heterogeneity.heterogeneity_report` computed directly on that split.
"""

import json

import numpy as np
import pytest
import torch

from asymvlm.cache import EmbeddingCache
from asymvlm.config import DataArguments
from asymvlm.errors import ConfigError
from asymvlm.federated.config import FederatedArguments
from asymvlm.federated.data import get_federated_data
from asymvlm.federated.heterogeneity import heterogeneity_report
from asymvlm.federated.partition import embedding_clusters, partition


@pytest.fixture(scope="module")
def cache(tmp_path_factory, synthetic_cache):
    return synthetic_cache(tmp_path_factory.mktemp("heterocache") / "c", 60)


def _fed(**kw) -> FederatedArguments:
    return FederatedArguments(num_clients=4, local_batch_size=16, progress=False, eval_every=0, **kw)


def _images_per_client(data) -> list[list[int]]:
    """The images each client holds (its batcher's caption rows' owners)."""
    return [sorted(set(b.owner.tolist())) for b in data.batchers]


def _image_embeddings(cache) -> np.ndarray:
    return EmbeddingCache.load(cache).image_embeddings.float().numpy()


def test_options_reach_the_partitioner_and_give_its_direct_split(cache):
    options = {"column": "image_embedding", "clusters": 3, "alpha": 0.2, "min_size": 2}
    fed = _fed(partition="embedding", partition_options=json.dumps(options))
    data = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    direct = partition({"image_embedding": _image_embeddings(cache)}, 4, "embedding", seed=fed.seed, **options)
    assert _images_per_client(data) == [p.tolist() for p in direct]
    assert data.num_examples == [len(p) for p in direct]
    # the three flags keep working alongside (and a YAML mapping is the same options)
    fed = _fed(partition="powerlaw", min_client_size=3, partition_options={"exponent": 2.0})
    assert fed.partition_kwargs() == {"min_size": 3, "exponent": 2.0}
    data = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    direct = partition(range(60), 4, "powerlaw", seed=fed.seed, exponent=2.0, min_size=3)
    assert _images_per_client(data) == [p.tolist() for p in direct]


def test_options_are_checked_strictly_and_once():
    with pytest.raises(ConfigError, match="unknown option 'clusters' for partition 'iid'"):
        _fed(partition="iid", partition_options='{"clusters": 3}')
    with pytest.raises(ConfigError, match="'alpha' is given both by --partition_alpha and by --partition_options"):
        _fed(partition="dirichlet", partition_alpha=0.1, partition_options="alpha: 0.3")
    with pytest.raises(ConfigError, match="must be a mapping"):
        _fed(partition_options="[1, 2]")
    assert _fed(partition="dirichlet", partition_options="alpha: 0.3").partition_kwargs()["alpha"] == 0.3


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--partition", "iid", "--partition_options", '{"clusters": 3}'], "unknown option 'clusters' for partition"),
        (
            ["--partition", "quantity", "--partition_alpha", "0.2", "--partition_options", '{"alpha": 0.9}'],
            "given both by --partition_alpha and by --partition_options",
        ),
    ],
)
def test_a_bad_option_is_one_line_through_the_command(cache, tmp_path, capsys, extra, expect):
    from asymvlm.training.federate import main

    out = tmp_path / "o"
    assert main(["--cache_dir", str(cache), "--output_dir", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("asymvlm-federate: error:") and expect in err[0], err
    assert not out.exists()


def test_the_embedding_partition_runs_end_to_end_and_writes_its_report(cache, tmp_path, capsys):
    from asymvlm.training.federate import main

    out = tmp_path / "emb"
    args = ["--cache_dir", str(cache), "--rounds", "1", "--num_clients", "4", "--local_steps", "1",
            "--local_batch_size", "16", "--hidden_dims", "16", "--progress", "false", "--output_dir", str(out),
            "--partition", "embedding", "--partition_options", '{"column": "image_embedding", "clusters": 3}',
            "--heterogeneity_report", "true"]  # fmt: skip
    assert main(args) == 0
    assert (out / "model" / "head.safetensors").is_file()
    written = json.loads((out / "heterogeneity.json").read_text())
    assert (out / "heterogeneity.png").stat().st_size > 0
    # the reference: the same split and the same clusters, computed directly
    emb = _image_embeddings(cache)
    parts = partition(
        {"image_embedding": emb}, 4, "embedding", seed=0, column="image_embedding", clusters=3, min_size=4
    )
    expected = heterogeneity_report(parts, embedding_clusters(emb, 3, seed=0))
    assert written["labels_from"] == "embedding clusters of 'image_embedding'"
    assert written["sizes"] == expected["sizes"] and written["histograms"] == expected["histograms"]
    assert written["js"] == pytest.approx(expected["js"], abs=1e-12)
    assert written["js_mean"] == pytest.approx(expected["js_mean"], abs=1e-12)
    assert written["options"] == {"column": "image_embedding", "clusters": 3, "alpha": 0.5, "min_size": 4}


def test_the_report_uses_the_column_or_sizes_only_and_changes_nothing(cache, tmp_path):
    from asymvlm.federated.data import partition_heterogeneity
    from asymvlm.federated.rounds import run_federated
    from asymvlm.heads import HeadConfig

    # a cache without label columns, split iid: client sizes only
    fed = _fed(partition="quantity", heterogeneity_report=True)
    on = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    assert on.heterogeneity["labels_from"] == "none (client sizes only)"
    assert on.heterogeneity["sizes"] == on.num_examples and on.heterogeneity["js"] == [0.0] * 4
    # a label column (here a stand-in table): its histograms, as heterogeneity_report gives them
    labels = np.arange(60) % 3
    parts = partition({"shape": labels}, 4, "dirichlet", seed=0, column="shape", alpha=0.3)
    fed = _fed(partition="dirichlet", partition_column="shape", partition_alpha=0.3)
    got = partition_heterogeneity(parts, {"shape": labels}, fed, fed.partition_kwargs())
    assert got["labels_from"] == "column 'shape'"
    assert got["js"] == heterogeneity_report(parts, labels)["js"]
    # the report only observes: the run is the same with and without it
    head = HeadConfig(hidden_dims=(16,))
    states = []
    for name, flag in (("on", True), ("off", False)):
        fed = _fed(
            partition="quantity", rounds=1, local_steps=2, output_dir=str(tmp_path / name), heterogeneity_report=flag
        )
        state, _ = run_federated(fed, get_federated_data(DataArguments(cache_dir=str(cache)), fed), head=head)
        states.append(state)
    assert all(torch.equal(states[0].params[k], states[1].params[k]) for k in states[1].params)


def test_the_report_gives_g2_of_the_initial_model(cache, tmp_path):
    from asymvlm.federated.client import build_client_model
    from asymvlm.federated.diagnostics import gradient_dissimilarity, model_gradient
    from asymvlm.federated.rounds import run_federated
    from asymvlm.federated.seeds import int_seed
    from asymvlm.heads import HeadConfig

    head = HeadConfig(dim=16, hidden_dims=(16,))
    fed = _fed(
        partition="quantity", rounds=1, local_steps=1, output_dir=str(tmp_path / "g2"), heterogeneity_report=True
    )
    data = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    run_federated(fed, data, head=head)
    # the reference: every client's mean gradient at the freshly initialised head, then sum_k p_k ||g_k - g||^2
    model = build_client_model(head, seed=fed.seed)
    params = model.get_params()
    fresh = get_federated_data(DataArguments(cache_dir=str(cache)), fed)
    grads = []
    for c, b in enumerate(fresh.batchers):
        b.reseed(int_seed(fed.seed, "diagnostics", 0, c))
        grads.append(model_gradient(model, params, b, 4, seed=int_seed(fed.seed, "diagnostics", 0, c)))
    ref = gradient_dissimilarity(grads, fresh.num_examples)
    assert data.heterogeneity["g2_initial"] == pytest.approx(ref, rel=1e-9) and ref > 0
