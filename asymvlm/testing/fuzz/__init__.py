"""A mutation fuzzer for every artefact asymvlm writes (issue 26, "close the class").

For each artefact kind (:data:`KINDS`) the harness builds a small valid artefact (tiny dimensions,
seconds), then changes ONE thing at a time — a JSON field, a tensor, a whole file, a folder entry, a
field of a Flower reply — loads the result the way the package does, and classifies what happened:

==============  ==================================================================================
outcome         meaning
==============  ==================================================================================
``clean``       an :class:`asymvlm.errors.AsymVLMError` whose one-line message names the mutated
                file (its name appears in the message); for Flower replies: the node or client is
                named, or the run ends normally with that client's reply rejected and recorded
``equal``       the load succeeded and its result equals the unmutated one (same tensors, same
                config): the change did not matter
``traceback``   any other exception (or no result within the time limit)
``silent``      the load succeeded with a different result: a tampered artefact was used
``unnamed``     an AsymVLMError that does not name the file (or spans several lines)
==============  ==================================================================================

Only ``clean`` and ``equal`` are acceptable. The mutations (:class:`Mutation`):

* every JSON field (nested dicts; lists: each element of a short list, the first of a long one;
  of sibling containers with the same structure only the first is entered): wrong type
  (``null``, ``string``, ``list``, ``dict``, ``bool``, ``huge_int`` 2**62, ``float_for_int``),
  out of range (``negative``, ``1e30``), ``nan``, ``inf``, ``missing``; path-like strings
  (``abs_path``, ``dotdot_path``, ``symlink_path``: a link inside the artefact to a file outside);
  per object ``extra_key``; per file ``deep_nesting`` (100,000 levels as raw JSON text),
  ``truncated``, ``garbage``, ``missing_file``;
* every safetensors tensor: ``nan``, ``inf`` (floats), ``negative``, ``huge_int`` (integers),
  ``wrong_shape``, ``dtype_int``, ``dtype_float16`` (``dtype_float32`` for float16 tensors),
  ``missing_tensor``; per file ``extra_tensor``, ``truncated``, ``garbage``, ``missing_file``;
* every file and sub-folder: ``symlink_outside`` (replaced by a link to the same entry of another
  valid artefact, outside the folder).

The harness is a package: :mod:`~asymvlm.testing.fuzz.outcomes` (mutations, results, comparing
loaded results), :mod:`~asymvlm.testing.fuzz.mutations` (JSON, safetensors and folder-entry
mutations), :mod:`~asymvlm.testing.fuzz.kinds` (the file artefacts),
:mod:`~asymvlm.testing.fuzz.replies` (Flower replies) and :mod:`~asymvlm.testing.fuzz.harness`
(building, running under limits, classifying). Its modules import one another relatively and
nothing here is imported by the package; the package under test is imported lazily, so the bench
(``bench/fuzz_artifacts.py --root``) can load this folder by path and point it at an older checkout.

Example (the outcome of one mutation; builds a tiny model folder, ~1 s):
    >>> import tempfile
    >>> h = Harness(tempfile.mkdtemp(), kinds=["model"])
    >>> m = next(m for m in h.mutations("model") if m.op == "garbage" and m.file == "head.safetensors")
    >>> h.run(m).outcome
    'clean'
"""

from .harness import EXEMPT, KINDS, Harness
from .outcomes import ACCEPTABLE, OUTCOMES, Mutation, Result, count_outcomes, same

__all__ = [
    "OUTCOMES",
    "ACCEPTABLE",
    "EXEMPT",
    "KINDS",
    "Mutation",
    "Result",
    "Harness",
    "same",
    "count_outcomes",
]
