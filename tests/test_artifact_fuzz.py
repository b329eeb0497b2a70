"""Issue 26, closing the class: one mutation at a time of every artefact asymvlm writes.

For each artefact kind (model folder, training checkpoint, federated round checkpoint, gallery,
embedding cache, task vector, merge output, Flower replies) hypothesis draws single mutations (a
JSON field of the wrong type or out of range, NaN, deep nesting, an extra or missing key, a path
outside the artefact, a tensor with NaN / another shape / another dtype, a truncated or garbage file,
a symlink to another artefact) from the harness's enumeration (:mod:`asymvlm.testing.fuzz`), loads
the artefact the way the package does, and asserts the outcome is ``clean`` (an AsymVLMError naming
the file, one line; for Flower: the node's reply rejected and recorded) or ``equal`` (the load gives
what the unmutated artefact gives) — never a traceback, never a silently different model.

The full enumeration, with counts per kind and outcome: ``python bench/fuzz_artifacts.py``.
"""

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from asymvlm.testing.fuzz import ACCEPTABLE, KINDS, Harness, Mutation, same

# examples per kind: the cheap loads get more (a Flower run costs ~0.5 s, a model folder ~10 ms)
EXAMPLES = {
    "model": 50, "cache": 50, "gallery": 50, "task_vector": 25, "merge_output": 25,
    "training_checkpoint": 25, "federated_checkpoint": 25, "flower": 12,
}  # fmt: skip


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return Harness(tmp_path_factory.mktemp("fuzz"), time_limit=60.0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_one_mutation_is_a_clear_error_or_changes_nothing(kind, harness):
    mutations = harness.mutations(kind)
    assert len(mutations) >= 20  # the enumeration found the artefact's files, fields and tensors

    @settings(
        max_examples=EXAMPLES[kind], deadline=None, derandomize=True, database=None,
        phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(st.sampled_from(mutations))
    def check(mutation: Mutation) -> None:
        r = harness.run(mutation)
        assert r.outcome in ACCEPTABLE, f"{r.id} -> {r.outcome}: {r.line}"

    check()


def test_the_harness_tells_the_outcomes_apart(harness):
    # the classifier itself must be able to fail: a garbage file is a clean error, and a different
    # but valid artefact (another seed) loads to a result that does not compare equal
    by_id = {m.id: m for m in harness.mutations("model")}
    assert harness.run(by_id["model:head.safetensors:<file>:garbage"]).outcome == "clean"
    prepared = harness.prepare("model")
    other = prepared.kind.load(prepared.variant, prepared.variant, prepared.support, None)
    assert not same(other, prepared.baseline)
    assert same(prepared.baseline, prepared.kind.load(prepared.pristine, prepared.pristine, prepared.support, None))
