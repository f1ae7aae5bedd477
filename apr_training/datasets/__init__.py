"""Datasets for apr_training: label/pairs CSVs, pair generation, subsets, transforms and torch datasets.

The CSV modules (:mod:`.labels`, :mod:`.pairs`) need only numpy and are imported eagerly; the torch-based names
(:mod:`.transforms`, :mod:`.torch_datasets`) are imported on first use, so ``import apr_training.datasets`` (and
:mod:`.from_bag`) stays light. Bag access lives in :mod:`apr_training.bags`, the renderer in
:mod:`apr_training.synthetic`.
"""

from __future__ import annotations

import importlib
from typing import Any

from .labels import (
    LABEL_COLUMNS,
    LabelError,
    LabelRow,
    LabelTable,
    read_labels,
    resolve_scene_ids,
    validate_images,
    write_labels,
)
from .pairs import (
    PAIR_COLUMNS,
    PairTable,
    generate_pairs,
    make_pairs,
    make_subset,
    read_pairs,
    subset_csv_path,
    write_pairs,
    write_subsets,
)

_LAZY = {
    "CameraPoseDataset": "torch_datasets",
    "ImageStore": "torch_datasets",
    "RelPoseDataset": "torch_datasets",
    "SceneEqualizedSampler": "torch_datasets",
    "load_rgb": "torch_datasets",
    "make_loader": "torch_datasets",
    "seed_worker": "torch_datasets",
    "DecoderTransform": "transforms",
    "TrainTransform": "transforms",
    "build_eval_transform": "transforms",
    "build_train_transform": "transforms",
}

__all__ = [
    "LABEL_COLUMNS",
    "PAIR_COLUMNS",
    "LabelError",
    "LabelRow",
    "LabelTable",
    "PairTable",
    "generate_pairs",
    "make_pairs",
    "make_subset",
    "read_labels",
    "read_pairs",
    "resolve_scene_ids",
    "subset_csv_path",
    "validate_images",
    "write_labels",
    "write_pairs",
    "write_subsets",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    """Import the torch-based names on first access."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """List the public names including the lazy ones."""
    return sorted(set(globals()) | set(_LAZY))
