"""Datasets as ``datasets.Dataset`` splits with a flattened, normalised ``x`` and an int ``label``.

``load_data(name, ...)`` reads a source (``data.sources`` for images and vectors, ``data.text``
for texts, tokenised), holds out a stratified test split where the source ships none (by
``test_fraction``), subsamples, and normalises.

Images are scaled to [0, 1] and standardised with published per-dataset constants; data without
known constants is standardised with its train split's statistics (per channel for images, per
column for vectors). Test splits are never used to compute statistics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import xxhash

from autorank.data.normalisation import (
    standardise,
    train_statistics,
)
from autorank.data.sources import SOURCES, DataError, Source, load_hub
from autorank.data.text import (
    TEXT_SOURCES,
    TextOptions,
    keep_keys,
    key_mask,
    token_blocks,
    tokenize,
)

if TYPE_CHECKING:  # imported where used: the engines' imports reach this module
    import datasets

logger = logging.getLogger(__name__)

# Drawn per client when sampled, never loaded whole (``autorank.data.synthetic``).
GENERATED = ("synthetic",)
KNOWN = (
    "digits",
    "mnist5k",
    "mnist",
    "fashion_mnist",
    "parquet",
    *GENERATED,
    *TEXT_SOURCES,
    "hf:<hub name>",
)
Split = Literal["train", "test"]


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train and test splits, ready for partitioning and training.

    Attributes:
        name: the name it was loaded by.
        train: columns ``x`` (``[d]`` float32, flattened and normalised) and ``label`` (int64).
        test: same columns.
        n_classes: number of classes; labels lie in ``[0, n_classes)``.
        input_shape: one sample's shape, ``(C, H, W)`` for images, ``(d,)`` for vectors,
            ``(2, L)`` for tokens (ids, then the attention mask; ``autorank.data.text``).
        tokens: x holds token ids and masks (int64), not features (float32).
        label_names: the classes' names, where the source has them.
        keys: each training sample's natural client (a user, a book), where the source has
            them (``partition.scheme: natural``).
        language_model: samples are token blocks for a causal LM, every label 0.
    """

    name: str
    train: datasets.Dataset
    test: datasets.Dataset
    n_classes: int
    input_shape: tuple[int, ...]
    tokens: bool = False
    label_names: tuple[str, ...] = ()
    keys: tuple[str, ...] | None = None
    language_model: bool = False

    def arrays(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """One split as arrays: x ``[n, *input_shape]`` float32 (int64 tokens), y ``[n]`` int64."""
        if split not in ("train", "test"):
            raise DataError(f"split {split!r} is unknown; expected 'train' or 'test'")
        ds = self.train if split == "train" else self.test
        columns = ds.with_format("numpy")[:]
        dtype = np.int64 if self.tokens else np.float32
        x = np.asarray(columns["x"], dtype=dtype).reshape(len(ds), *self.input_shape)
        return x, np.asarray(columns["label"], dtype=np.int64)

    def digest(self, split: Split) -> str:
        """A split's content digest: the fingerprint ``_to_dataset`` gives it (xxh3 of x, y)."""
        return str((self.train if split == "train" else self.test)._fingerprint)


def load_data(
    name: str,
    *,
    path: Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_train_samples: int | None = None,
    text: TextOptions | None = None,
    max_test_samples: int | None = None,
) -> DatasetSplits:
    """Load a dataset by name into normalised train/test ``datasets.Dataset`` splits.

    Args:
        name: one of ``KNOWN`` (``hf:<hub name>`` for any Hub dataset).
        path: IDX folder (``mnist``, ``fashion_mnist``) or parquet folder/file (``parquet``).
        test_fraction: share held out, stratified, when the source ships no test split.
        seed: seed of the held-out split and of the train subsample.
        max_train_samples: keep a stratified subsample of this many training samples.
        text: for text sources, the tokenizer and sample length.
        max_test_samples: keep a stratified subsample of this many test samples (the global
            evaluation runs every round).

    Raises:
        DataError: unknown name, missing files, malformed data or bad arguments.
    """
    if isinstance(test_fraction, bool) or not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    if max_train_samples is not None and (
        isinstance(max_train_samples, bool) or int(max_train_samples) < 1
    ):
        raise DataError(f"max_train_samples must be a positive integer, got {max_train_samples!r}")
    source = _read_source(name, path, text)
    split_seed, sample_seed, test_seed = np.random.SeedSequence(seed).spawn(3)
    x_train, y_train = _check_pair(source.x_train, source.y_train, f"{name} train")
    keys = source.keys
    if source.test is None:  # stratified hold-out, as the source ships no test split
        test_idx, train_idx = _stratified_take(
            y_train, _n_held_out(len(y_train), test_fraction), np.random.default_rng(split_seed)
        )
        x_test, y_test = x_train[test_idx], y_train[test_idx]
        x_train, y_train = x_train[train_idx], y_train[train_idx]
        keys = None if keys is None else keys[train_idx]
    else:
        x_test, y_test = _check_pair(*source.test, f"{name} test")
    if max_train_samples is not None and max_train_samples < len(y_train):
        keep, _ = _stratified_take(y_train, max_train_samples, np.random.default_rng(sample_seed))
        x_train, y_train = x_train[keep], y_train[keep]
        keys = None if keys is None else keys[keep]
    if max_test_samples is not None and max_test_samples < len(y_test):
        keep, _ = _stratified_take(y_test, max_test_samples, np.random.default_rng(test_seed))
        x_test, y_test = x_test[keep], y_test[keep]
    n_classes = _count_classes(source.n_classes, y_train, y_test, name)
    shape = tuple(int(s) for s in x_train.shape[1:])
    logger.info("%s: %d train, %d test, %d classes", name, len(y_train), len(y_test), n_classes)
    pairs = ((x_train, y_train), (x_test, y_test))
    if source.tokens:
        train, test = (_to_dataset(x, y, np.int64) for x, y in pairs)
    else:
        norm = source.norm or train_statistics(x_train)
        train, test = (_to_dataset(standardise(x, norm), y) for x, y in pairs)
    return DatasetSplits(
        name,
        train,
        test,
        n_classes,
        shape,
        tokens=source.tokens,
        label_names=source.label_names,
        keys=None if keys is None else tuple(str(k) for k in keys),
        language_model=text is not None and text.blocks,
    )


def _read_source(name: str, path: Path | None, text: TextOptions | None) -> Source:
    if name in TEXT_SOURCES:
        if text is None:
            raise DataError(f"dataset {name!r} is text; expected the model's tokenizer with it")
        return _text_source(name, path, text)
    if name.startswith("hf:"):
        hub_name = name[3:].strip()
        if not hub_name:
            raise DataError(
                f"dataset {name!r} names no Hub dataset; expected e.g. 'hf:ylecun/mnist'"
            )
        return load_hub(hub_name)
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(KNOWN)}")
    if path is not None and name in ("digits", "mnist5k"):
        logger.warning("%s is embedded in its package; path %s is ignored", name, path)
    return SOURCES[name](path)


def _text_source(name: str, path: Path | None, text: TextOptions) -> Source:
    """Texts read, kept to ``text.train_keys`` (and ``test_keys``), tokenised (a causal LM's
    into blocks), and split by ``text.test_keys`` where it names held-out clients."""
    kept = None if text.train_keys is None else (*text.train_keys, *(text.test_keys or ()))
    table = keep_keys(TEXT_SOURCES[name](path, text), kept, name)
    if text.blocks:
        x, origin = token_blocks(table.texts, text)
        y, keys = table.labels[origin], None if table.keys is None else table.keys[origin]
    else:
        x, y, keys = tokenize(table.texts, text), table.labels, table.keys
    n, names, test = len(table.label_names), table.label_names, None
    if text.test_keys is not None:
        held = key_mask(keys, text.test_keys, name, "data.test_keys")
        if held.all():
            raise DataError(f"{name}: data.test_keys hold every sample; expected some to train on")
        test = (x[held], y[held])
        x, y, keys = x[~held], y[~held], None if keys is None else keys[~held]
    return Source(x, y, test, None, n, True, names, keys)


def _check_pair(x: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    if len(y) == 0:
        raise DataError(f"{what}: no samples; expected at least one")
    if len(x) != len(y):
        raise DataError(f"{what}: {len(x)} samples but {len(y)} labels; expected equal counts")
    return x, y


def _count_classes(declared: int | None, y_train: np.ndarray, y_test: np.ndarray, name: str) -> int:
    if min(y_train.min(initial=0), y_test.min(initial=0)) < 0:
        raise DataError(f"{name}: negative labels found; expected labels 0..C-1")
    seen = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
    if declared is not None and seen > declared:
        raise DataError(f"{name}: label {seen - 1} out of range; expected 0..{declared - 1}")
    if declared is not None:
        return declared
    n = len(y_train) + len(y_test)
    if seen > n:  # labels are class indices, so C classes need C samples at least
        raise DataError(
            f"{name}: labels go up to {seen - 1} but there are {n} samples; expected labels "
            "0..C-1 with C at most the number of samples (is the label column right?)"
        )
    return seen


def _n_held_out(n: int, fraction: float) -> int:
    if n < 2:
        raise DataError(f"cannot hold out a test split from {n} sample(s); expected at least 2")
    return min(max(round(n * fraction), 1), n - 1)


def _stratified_take(
    y: np.ndarray, n_take: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a class-proportional random sample of ``n_take`` and of the rest, both sorted.

    Each class gets ``floor(n_take * n_c / n)``; the leftover goes to the largest remainders.
    """
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n_take / len(y)
    take = np.floor(quota).astype(np.int64)
    leftover = n_take - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:leftover]] += 1
    chosen = [
        rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take, strict=True)
    ]
    picked = np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)
    mask = np.zeros(len(y), dtype=bool)
    mask[picked] = True
    return picked, np.flatnonzero(~mask)


def splits_from_arrays(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    n_classes: int,
) -> DatasetSplits:
    """Feature vectors already on a unit scale (a generated data set) as splits, unnormalised."""
    return DatasetSplits(
        name,
        _to_dataset(*train),
        _to_dataset(*test),
        n_classes,
        tuple(int(s) for s in train[0].shape[1:]),
    )


def _to_dataset(
    x: np.ndarray, y: np.ndarray, dtype: type[np.generic] = np.float32
) -> datasets.Dataset:
    """A Dataset over Arrow buffers of x ``[n, *shape]`` and y ``[n]``, without per-row copies."""
    flat = np.ascontiguousarray(x.reshape(len(x), int(np.prod(x.shape[1:]))), dtype=dtype)
    labels = np.ascontiguousarray(y, dtype=np.int64)
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    table = pa.table({"x": column, "label": pa.array(labels)})
    # A content hash is ~50x cheaper than the fingerprint datasets computes by itself.
    digest = xxhash.xxh3_64(flat.data)
    digest.update(labels.data)
    digest.update(repr(flat.shape).encode())
    import datasets

    return datasets.Dataset(datasets.table.InMemoryTable(table), fingerprint=digest.hexdigest())
