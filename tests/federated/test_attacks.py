"""Built-in client attacks: each does what its definition says, and runs through --attack."""

import math

import pytest
import torch
from scipy.stats import norm

from asymvlm.federated.attacks import ATTACKS, ShuffledCaptions, alie_z, attack_updates


def deltas(k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)} for _ in range(k)]


def test_alie_z_is_the_papers_quantile():
    # Baruch et al. 2019: s = floor(n/2 + 1) - f, z_max = Phi^-1((n - s) / n)
    for n, f in ((50, 12), (10, 2), (10, 4), (100, 20)):
        s = math.floor(n / 2 + 1) - f
        assert alie_z(n, f) == pytest.approx(norm.ppf((n - s) / n), rel=1e-12)


def test_update_attacks():
    d = deltas()
    honest = {0, 3}
    bad = {1, 4}
    flip = attack_updates("sign_flip", d, bad, scale=10.0, seed=0)
    scaled = attack_updates("scale", d, bad, scale=-10.0, seed=0)
    gauss = attack_updates("gaussian", d, bad, scale=3.0, seed=0)
    alie = attack_updates("alie", d, bad, scale=1.0, seed=0)
    z = alie_z(5, 2)
    for k in d[0]:
        stack = torch.stack([x[k].double() for x in d])
        forged = (stack.mean(0) - z * stack.std(0, unbiased=False)).float()
        for i in bad:
            assert torch.equal(flip[i][k], -d[i][k]) and torch.equal(scaled[i][k], -10.0 * d[i][k])
            torch.testing.assert_close(alie[i][k], forged)
        for i in honest:
            assert torch.equal(flip[i][k], d[i][k]) and torch.equal(gauss[i][k], d[i][k])
    for i in bad:
        norm_h = math.sqrt(sum(float(v.pow(2).sum()) for v in d[i].values()))
        norm_g = math.sqrt(sum(float(v.pow(2).sum()) for v in gauss[i].values()))
        assert norm_g == pytest.approx(3.0 * norm_h, rel=1e-5)
        assert not torch.allclose(gauss[i]["a"], 3.0 * d[i]["a"])  # noise, not a scaled update


def test_caption_shuffle_pairs_captions_with_the_wrong_images():
    from asymvlm.batching import IndexBatcher

    img = torch.nn.functional.normalize(torch.randn(20, 4), dim=-1)
    b = IndexBatcher(img.clone(), img, torch.arange(20), 8, 0)
    s = ShuffledCaptions(b, seed=1)
    clean, bad = b.batch(0), s.batch(0)
    assert torch.equal(clean["ids"], bad["ids"]) and torch.equal(clean["text"], bad["text"])
    assert torch.equal(bad["images"], img[s.perm[bad["ids"]]]) and not torch.equal(bad["images"], clean["images"])
    assert s.num_batches == b.num_batches  # everything else is the client's own batcher


def test_every_attack_runs_through_the_rounds(tmp_path):
    from asymvlm.cache import write_cache
    from asymvlm.config import DataArguments
    from asymvlm.federated.config import FederatedArguments
    from asymvlm.federated.data import get_federated_data
    from asymvlm.federated.rounds import run_federated
    from asymvlm.heads import HeadConfig

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=-1)
    idx = torch.arange(50).repeat_interleave(2)
    write_cache(tmp_path / "c", img, torch.nn.functional.normalize(img[idx] + 0.2 * torch.randn(100, 8), dim=-1), idx)
    finals = {}
    for attack in ATTACKS:
        fed = FederatedArguments(
            rounds=2, num_clients=5, local_steps=2, local_batch_size=8, progress=False, attack=attack,
            malicious_fraction=0.4 if attack != "none" else 0.0, output_dir=str(tmp_path / attack),
        )  # fmt: skip
        state, _ = run_federated(fed, get_federated_data(DataArguments(cache_dir=str(tmp_path / "c")), fed),
                                 head=HeadConfig(hidden_dims=[8]))  # fmt: skip
        finals[attack] = state.params
    for attack in ATTACKS:
        if attack != "none":  # every attack changes the model the mean converges to
            assert any(not torch.equal(finals[attack][k], finals["none"][k]) for k in finals["none"]), attack
