"""Large collections for ``naclip segment``: the input list (files, folders, ``--recursive``, glob patterns),
the mirrored output tree, ``--skip-existing``, the manifest, decoding ahead of the model and the torchrun
share of each rank.

Contract (design and manifest format: ``docs/collections.md``):

* **Inputs**: each argument in the order given; a folder gives its image files (suffixes Pillow can open,
  :data:`IMAGE_SUFFIXES`), sorted by relative path, subfolders too with ``--recursive``; a pattern with
  ``* ? [`` is expanded by us (``**`` spans folders with ``--recursive``); duplicates keep their first place.
* **Outputs** mirror the input tree: ``<out>/<path relative to the folder or pattern root>/<stem>_mask.png``;
  explicit files land in ``<out>`` itself; names that meet in one output folder get ``<stem>_<ext>[_<n>]``.
* **Ranks**: input ``i`` of the full sorted list belongs to rank ``i % world``; each rank reads, checks and
  segments only its share; rank 0 writes the merged manifest after an ``all_gather``.

The modules: :mod:`~naclip.collection.inputs` (the input list and output plan),
:mod:`~naclip.collection.manifest` (fingerprint, journals, manifest), :mod:`~naclip.collection.prefetch`
(decoding ahead), :mod:`~naclip.collection.run` (the run) and :mod:`~naclip.collection.args` (the options).
This package re-exports their public names.
"""

from __future__ import annotations

from naclip.collection.args import add_collection_args
from naclip.collection.inputs import (
    IMAGE_SUFFIXES,
    CollectionError,
    Input,
    OutputPaths,
    collect_inputs,
    expected_outputs,
    is_video,
    plan_outputs,
)
from naclip.collection.manifest import MANIFEST_NAME, read_records, settings_fingerprint
from naclip.collection.prefetch import prefetch
from naclip.collection.run import Hooks, Options, Outcome, run_collection

__all__ = [
    "IMAGE_SUFFIXES",
    "MANIFEST_NAME",
    "CollectionError",
    "Hooks",
    "Input",
    "Options",
    "Outcome",
    "OutputPaths",
    "add_collection_args",
    "collect_inputs",
    "expected_outputs",
    "is_video",
    "plan_outputs",
    "prefetch",
    "read_records",
    "run_collection",
    "settings_fingerprint",
]
