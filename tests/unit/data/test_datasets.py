"""Tests for autorank.data.datasets: every source on real or small hand-written files; errors."""

from __future__ import annotations

import gzip
import io
import os
import struct
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from autorank.data import sources as data
from autorank.data.datasets import DatasetSplits, load_data
from autorank.data.sources import DataError

_IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    return load_data("digits")


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # load_dataset("parquet") writes Arrow caches; keep them out of the user's home.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def _pixels(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _write_idx(path: Path, array: np.ndarray, *, gz: bool) -> None:
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _idx_folder(
    folder: Path, *, gz: bool, n_train: int = 30, n_test: int = 10
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Four IDX files of 5x4 images; returns the pixels and labels written."""
    written = {}
    for split, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = _pixels(n, (5, 4), seed), np.arange(n, dtype=np.uint8) % 3
        suffix = ".gz" if gz else ""
        _write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, gz=gz)
        _write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, gz=gz)
        written[split] = (images, labels)
    return written


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_table(pixels: np.ndarray, labels: np.ndarray) -> pa.Table:
    cells = [{"bytes": _png(p), "path": None} for p in pixels]
    return pa.table({"image": pa.array(cells, type=_IMAGE_STRUCT), "label": pa.array(labels)})


# --- embedded sources -------------------------------------------------------------------------


def test_digits_shapes_and_columns(digits: DatasetSplits) -> None:
    x, y = digits.arrays("train")
    x_test, _ = digits.arrays("test")

    assert (digits.input_shape, digits.n_classes) == ((1, 8, 8), 10)
    assert x.shape == (1797 - 359, 1, 8, 8) and x_test.shape == (359, 1, 8, 8)
    assert (x.dtype, y.dtype) == (np.float32, np.int64)
    assert digits.train.column_names == ["x", "label"]
    assert digits.train.features["x"].length == 64


def test_digits_train_is_standardised(digits: DatasetSplits) -> None:
    x, _ = digits.arrays("train")

    assert abs(float(x.mean())) < 0.05
    assert abs(float(x.std()) - 1.0) < 0.05


def test_digits_split_is_stratified(digits: DatasetSplits) -> None:
    _, y_train = digits.arrays("train")
    _, y_test = digits.arrays("test")

    total = np.bincount(np.concatenate([y_train, y_test]), minlength=10)
    assert np.all(np.abs(np.bincount(y_test, minlength=10) - 0.2 * total) <= 1)


def test_split_is_deterministic_by_seed() -> None:
    first, again, other = (load_data("digits", seed=s) for s in (3, 3, 4))

    np.testing.assert_array_equal(first.arrays("test")[0], again.arrays("test")[0])
    assert not np.array_equal(first.arrays("test")[0], other.arrays("test")[0])


def test_max_train_samples_is_stratified_and_seeded() -> None:
    small = load_data("digits", max_train_samples=100, seed=1)
    same = load_data("digits", max_train_samples=100, seed=1)

    x, y = small.arrays("train")
    assert x.shape[0] == 100
    assert np.all(np.abs(np.bincount(y, minlength=10) - 10) <= 1)
    np.testing.assert_array_equal(x, same.arrays("train")[0])
    assert len(small.test) == 359


def test_mnist5k_loads_real_digits() -> None:
    splits = load_data("mnist5k", test_fraction=0.1)

    x, y = splits.arrays("test")
    assert splits.input_shape == (1, 28, 28)
    assert (len(splits.train), x.shape) == (4500, (500, 1, 28, 28))
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 50))
    assert float(x.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-5)


# --- IDX folders -------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_round_trips(tmp_path: Path, gz: bool) -> None:
    written = _idx_folder(tmp_path, gz=gz)

    splits = load_data("mnist", path=tmp_path)

    x, y = splits.arrays("train")
    x_test, y_test = splits.arrays("test")
    assert splits.input_shape == (1, 5, 4) and splits.n_classes == 3
    np.testing.assert_allclose((x[:, 0] * 0.3081 + 0.1307) * 255, written["train"][0], atol=1e-3)
    np.testing.assert_array_equal(y_test, written["t10k"][1])
    assert x_test.shape == (10, 1, 5, 4) and len(y) == 30


def test_fashion_mnist_reads_its_default_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = _idx_folder(tmp_path, gz=True)
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)

    splits = load_data("fashion_mnist")

    x, _ = splits.arrays("train")
    np.testing.assert_allclose((x[:, 0] * 0.3530 + 0.2860) * 255, written["train"][0], atol=1e-3)


def test_debian_fashion_mnist_path_is_the_package_one() -> None:
    assert Path("/usr/share/datasets/fashion-mnist") == data.FASHION_MNIST_DIR


def test_missing_fashion_mnist_folder_names_path_and_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")

    with pytest.raises(DataError, match=r"absent.*train-images-idx3-ubyte\[\.gz\]") as err:
        load_data("fashion_mnist")
    assert "apt-get install dataset-fashion-mnist" in str(err.value)


def test_mnist_without_path_asks_for_one() -> None:
    with pytest.raises(DataError, match=r"mnist needs data\.path"):
        load_data("mnist")


def test_missing_idx_file_is_named(tmp_path: Path) -> None:
    _idx_folder(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()

    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_data("mnist", path=tmp_path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: b"\x00\x00\x09\x03" + raw[4:], "bad IDX magic number 0x00000903"),
        (lambda raw: raw[:-7], "expected"),
        (lambda raw: raw[:6], "truncated IDX header"),
    ],
)
def test_bad_idx_file_is_named(
    tmp_path: Path, damage: Callable[[bytes], bytes], message: str
) -> None:
    _idx_folder(tmp_path, gz=False)
    target = tmp_path / "train-images-idx3-ubyte"
    target.write_bytes(damage(target.read_bytes()))

    with pytest.raises(DataError, match=f"train-images-idx3-ubyte.*{message}"):
        load_data("mnist", path=tmp_path)


def test_corrupt_gzip_is_named(tmp_path: Path) -> None:
    _idx_folder(tmp_path, gz=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")

    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz"):
        load_data("mnist", path=tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the file is empty; expected an IDX file"),
        (struct.pack(">IIII", 0x803, 0, 5, 4), "the IDX header declares 0 items"),
    ],
    ids=["empty", "no-items"],
)
def test_an_idx_file_without_samples_is_named(tmp_path: Path, content: bytes, message: str) -> None:
    _idx_folder(tmp_path, gz=False)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(content)

    with pytest.raises(DataError, match=f"train-images-idx3-ubyte: {message}"):
        load_data("mnist", path=tmp_path)


def test_image_label_count_mismatch(tmp_path: Path) -> None:
    _idx_folder(tmp_path, gz=False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(29, dtype=np.uint8), gz=False)

    with pytest.raises(DataError, match=r"30 images but .* 29 labels"):
        load_data("mnist", path=tmp_path)


# --- parquet ------------------------------------------------------------------------------------


def test_parquet_folder_with_grayscale_pngs(tmp_path: Path) -> None:
    train_pixels, test_pixels = _pixels(24, (6, 6), 5), _pixels(8, (6, 6), 6)
    pq.write_table(_image_table(train_pixels, np.arange(24) % 4), tmp_path / "train.parquet")
    pq.write_table(_image_table(test_pixels, np.arange(8) % 4), tmp_path / "test.parquet")

    splits = load_data("parquet", path=tmp_path)

    x, y = splits.arrays("train")
    assert (splits.input_shape, splits.n_classes, len(splits.test)) == ((1, 6, 6), 4, 8)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-4
    restored = x[:, 0] * (train_pixels / 255.0).std() + (train_pixels / 255.0).mean()
    np.testing.assert_allclose(restored * 255, train_pixels, atol=1e-2)
    np.testing.assert_array_equal(y, np.arange(24) % 4)


def test_parquet_single_file_with_rgb_pngs_is_split(tmp_path: Path) -> None:
    pixels = _pixels(40, (5, 7, 3), 7)
    pq.write_table(_image_table(pixels, np.arange(40) % 2), tmp_path / "all.parquet")

    splits = load_data("parquet", path=tmp_path / "all.parquet", test_fraction=0.25)

    x, _ = splits.arrays("train")
    assert splits.input_shape == (3, 5, 7)
    assert (len(splits.train), len(splits.test)) == (30, 10)
    np.testing.assert_allclose(x.mean(axis=(0, 2, 3)), 0.0, atol=1e-4)


def test_parquet_labels_beyond_the_sample_count_are_refused(tmp_path: Path) -> None:
    table = pa.table({"a": np.arange(30.0), "label": [0] * 29 + [1_000_000]})
    pq.write_table(table, tmp_path / "train.parquet")

    with pytest.raises(DataError, match="labels go up to 1000000 but there are 30 samples"):
        load_data("parquet", path=tmp_path)


def test_parquet_numeric_columns_become_vectors(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    table = pa.table({"a": rng.normal(5, 2, 20), "b": rng.integers(0, 9, 20), "label": [0, 1] * 10})
    pq.write_table(table, tmp_path / "train.parquet")

    splits = load_data("parquet", path=tmp_path, test_fraction=0.5)

    x, _ = splits.arrays("train")
    assert splits.input_shape == (2,) and x.shape == (10, 2)
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(x.std(axis=0), 1.0, atol=1e-5)


def test_parquet_without_usable_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), tmp_path / "train.parquet")

    with pytest.raises(DataError, match="expected an 'image'/'img' column or numeric"):
        load_data("parquet", path=tmp_path)


def test_parquet_missing_train_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train\.parquet.* not found"):
        load_data("parquet", path=tmp_path)


# --- Hugging Face Hub ----------------------------------------------------------------------------


def _hub_dict(column: str, channels: int, n_train: int = 20) -> datasets.DatasetDict:
    def split(n: int, seed: int) -> datasets.Dataset:
        shape = (4, 4) if channels == 1 else (4, 4, channels)
        images = [Image.fromarray(p) for p in _pixels(n, shape, seed)]
        features = datasets.Features(
            {column: datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
        )
        return datasets.Dataset.from_dict(
            {column: images, "label": [i % 5 for i in range(n)]}, features=features
        )

    return datasets.DatasetDict({"train": split(n_train, 11), "test": split(6, 12)})


def test_hub_mnist_uses_published_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _hub_dict("image", 1)
    asked: list[str] = []

    def fake_load(name: str) -> datasets.DatasetDict:
        asked.append(name)
        return fake

    monkeypatch.setattr(datasets, "load_dataset", fake_load)

    splits = load_data("hf:ylecun/mnist")

    x, _ = splits.arrays("train")
    pixels = np.stack([np.asarray(im) for im in fake["train"]["image"]])
    assert asked == ["ylecun/mnist"]
    assert (splits.input_shape, splits.n_classes) == ((1, 4, 4), 10)
    np.testing.assert_allclose((x[:, 0] * 0.3081 + 0.1307) * 255, pixels, atol=1e-3)


def test_hub_cifar_reads_rgb_img_column(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "load_dataset", lambda name: _hub_dict("img", 3))

    splits = load_data("hf:uoft-cs/cifar10")

    x, _ = splits.arrays("test")
    assert splits.input_shape == (3, 4, 4) and x.shape == (6, 3, 4, 4)
    assert float(x[:, 2].min()) >= -0.4465 / 0.2616 - 1e-5


def test_hub_unknown_dataset_uses_train_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "load_dataset", lambda name: _hub_dict("image", 1))

    splits = load_data("hf:someone/glyphs")

    x, _ = splits.arrays("train")
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-4


def test_hub_offline_gives_one_clear_line() -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest: the call cannot go online

    with pytest.raises(DataError, match=r"from the Hugging Face Hub.*internet") as caught:
        load_data("hf:autorank-tests/no-such-dataset")

    assert "\n" not in str(caught.value)


# --- argument errors -----------------------------------------------------------------------------


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(DataError, match=r"unknown dataset 'cifar'.*digits, mnist5k.*hf:"):
        load_data("cifar")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_bad_test_fraction(fraction: float) -> None:
    with pytest.raises(DataError, match=f"test_fraction .* got {fraction}"):
        load_data("digits", test_fraction=fraction)


def test_bad_max_train_samples() -> None:
    with pytest.raises(DataError, match=r"max_train_samples .* got 0"):
        load_data("digits", max_train_samples=0)


def test_empty_hub_name() -> None:
    with pytest.raises(DataError, match="names no Hub dataset"):
        load_data("hf:")


def test_unknown_split_name(digits: DatasetSplits) -> None:
    with pytest.raises(DataError, match="split 'valid' is unknown"):
        digits.arrays("valid")  # type: ignore[arg-type]


BAD_VALUES = [
    (np.nan, "column 'b' has 1 NaN or infinite value(s) as float32 (the first in row 3"),
    (-np.inf, "column 'b' has 1 NaN or infinite value(s)"),
    (1e300, "column 'b' has 1 NaN or infinite value(s) as float32"),  # inf as float32
    (None, "column 'b' has 1 empty cell(s); expected a number in every row"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_VALUES, ids=["nan", "-inf", "1e300", "empty"])
def test_parquet_features_that_cannot_train_are_refused_with_file_and_column(
    tmp_path: Path, bad: float | None, message: str
) -> None:
    b: list[float | None] = [float(i) for i in range(20)]
    b[3] = bad
    pq.write_table(pa.table({"a": np.ones(20), "b": b, "label": [0, 1] * 10}), tmp_path / "x.pq")

    with pytest.raises(DataError) as info:
        load_data("parquet", path=tmp_path / "x.pq")

    assert str(info.value).startswith(f"parquet {str(tmp_path / 'x.pq')!r}: {message}")


def test_a_bad_test_split_names_its_own_file(tmp_path: Path) -> None:
    good = pa.table({"a": np.arange(10.0), "label": [0, 1] * 5})
    pq.write_table(good, tmp_path / "train.parquet")
    pq.write_table(good.set_column(0, "a", pa.array([np.inf] * 10)), tmp_path / "test.parquet")

    with pytest.raises(DataError, match=r"test\.parquet': column 'a' has 10 NaN or infinite"):
        load_data("parquet", path=tmp_path)


def test_empty_labels_in_parquet_are_refused(tmp_path: Path) -> None:
    pq.write_table(pa.table({"a": np.arange(4.0), "label": [0, 1, None, 1]}), tmp_path / "x.pq")

    with pytest.raises(DataError, match="column 'label' has 1 empty cell"):
        load_data("parquet", path=tmp_path / "x.pq")


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "holds no rows; expected labelled samples"), (b"PAR1 not really", "could not be")],
    ids=["no-rows", "not-parquet"],
)
def test_a_parquet_file_without_samples_is_named(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    file = tmp_path / "x.parquet"
    if content is None:
        pq.write_table(
            pa.table({"a": pa.array([], pa.float64()), "label": pa.array([], pa.int64())}), file
        )
    else:
        file.write_bytes(content)

    with pytest.raises(DataError, match=f"parquet '{file}' {message}"):
        load_data("parquet", path=file)


def test_parquet_reads_the_class_names_datasets_stores(tmp_path: Path) -> None:
    features = datasets.Features(
        {"a": datasets.Value("float32"), "label": datasets.ClassLabel(names=["x", "y", "z"])}
    )
    datasets.Dataset.from_dict(
        {"a": [0.0, 1.0, 2.0, 3.0], "label": [0, 1, 0, 1]}, features=features
    ).to_parquet(tmp_path / "x.parquet")

    splits = load_data("parquet", path=tmp_path / "x.parquet", test_fraction=0.5)

    assert splits.n_classes == 3  # from the ClassLabel, though label 2 never occurs
