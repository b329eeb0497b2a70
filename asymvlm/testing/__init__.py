"""Harnesses for the tests and the benchmarks (nothing in the package imports this package).

* :mod:`asymvlm.testing.fuzz` — a mutation fuzzer for every artefact asymvlm writes: build a small
  valid one, change one field, one tensor or one file at a time, load it the way the package does,
  and classify what happened (``tests/test_artifact_fuzz.py``, ``bench/fuzz_artifacts.py``).
"""

__all__: list[str] = []
