"""Text sources and tokenisation, on small files written here and a tiny tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from autorank.data.datasets import load_data
from autorank.data.text import TextDataError, TextOptions, read_text_file, tokenize
from tests.unit.conftest import TEXT_WORDS, tiny_text_corpus


def _csv(path: Path, texts: list[str], labels: list[object], header: str = "text,label") -> Path:
    rows = [header, *(f'"{t}",{label}' for t, label in zip(texts, labels, strict=True))]
    path.write_text("\n".join(rows) + "\n")
    return path


def _options(folder: Path, tmp_path: Path, **kw: object) -> TextOptions:
    return TextOptions(tokenizer=folder, max_length=8, cache_dir=tmp_path / "cache", **kw)  # type: ignore[arg-type]


def test_string_labels_are_numbered_in_sorted_order(tiny_bert_dir: Path, tmp_path: Path) -> None:
    file = _csv(tmp_path / "d.csv", ["good day", "bad night", "okay film"], ["pos", "neg", "neu"])

    table = read_text_file(file, _options(tiny_bert_dir, tmp_path))

    assert table.label_names == ("neg", "neu", "pos")
    assert table.labels.tolist() == [2, 0, 1]
    assert table.texts == ["good day", "bad night", "okay film"]


@pytest.mark.parametrize("kind", ["json", "parquet"])
def test_json_lines_and_parquet_files_read_like_csv(
    kind: str, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    rows = [{"body": "good day", "y": 1}, {"body": "bad night", "y": 0}]
    if kind == "json":
        file = tmp_path / "d.jsonl"
        file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        file = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), file)
    options = _options(tiny_bert_dir, tmp_path, text_column="body", label_column="y")

    table = read_text_file(file, options)

    assert table.texts == ["good day", "bad night"]
    assert table.labels.tolist() == [1, 0]
    assert table.label_names == ("0", "1")


@pytest.mark.parametrize(
    ("header", "texts", "expected"),
    [
        ("body,label", ["good", "bad"], "no text column 'text' (data.text_column)"),
        ("text,y", ["good", "bad"], "no label column 'label' (data.label_column)"),
        ("text,label", ["good", " "], "1 empty texts (first at row 1)"),
    ],
)
def test_bad_text_files_are_refused_naming_the_column_or_row(
    header: str, texts: list[str], expected: str, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    file = _csv(tmp_path / "d.csv", texts, [0, 1], header=header)

    with pytest.raises(TextDataError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        read_text_file(file, _options(tiny_bert_dir, tmp_path))


@pytest.mark.parametrize("name", ["absent.csv", "texts.txt"])
def test_a_missing_file_or_another_kind_is_refused(
    name: str, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "texts.txt").write_text("good day\nbad night\n")

    with pytest.raises(TextDataError, match=r"is not a \.csv/\.json/\.jsonl/\.parquet file"):
        read_text_file(tmp_path / name, _options(tiny_bert_dir, tmp_path))


def test_tokens_pack_ids_then_the_mask_and_are_cached(tiny_bert_dir: Path, tmp_path: Path) -> None:
    options = _options(tiny_bert_dir, tmp_path)
    texts = ["good day", "the film was very very very not so good at all"]

    first = tokenize(texts, options)
    cached = sorted((tmp_path / "cache").glob("tokens-*.arrow"))
    again = tokenize(texts, options)

    assert first.shape == (2, 2, 8) and first.dtype == np.int64
    # [CLS] good day [SEP], then padding (id 0) with mask 0
    good, day = (4 + TEXT_WORDS.index(w) for w in ("good", "day"))
    assert first[0, 0, :4].tolist() == [2, good, day, 3] and first[0, 0, 4:].tolist() == [0] * 4
    assert first[0, 1].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert first[1, 1].tolist() == [1] * 8  # truncated to max_length
    assert len(cached) == 1
    np.testing.assert_array_equal(again, first)


def test_load_data_gives_token_splits(tiny_bert_dir: Path, tmp_path: Path) -> None:
    texts, labels = tiny_text_corpus(60)
    file = _csv(tmp_path / "d.csv", texts, labels)

    data = load_data(
        "text", path=file, test_fraction=0.2, seed=0, text=_options(tiny_bert_dir, tmp_path)
    )
    x, y = data.arrays("train")

    assert data.tokens and data.input_shape == (2, 8) and data.n_classes == 3
    assert data.label_names == ("0", "1", "2")
    assert x.dtype == np.int64 and x.shape == (48, 2, 8)
    assert sorted(np.bincount(y).tolist()) == [16, 16, 16]  # stratified hold-out of 12


def test_the_test_split_can_be_subsampled_stratified(tiny_bert_dir: Path, tmp_path: Path) -> None:
    texts, labels = tiny_text_corpus(60)
    file = _csv(tmp_path / "d.csv", texts, labels)
    options = _options(tiny_bert_dir, tmp_path)

    full = load_data("text", path=file, seed=0, text=options)
    small = load_data("text", path=file, seed=0, text=options, max_test_samples=6)

    assert np.bincount(small.arrays("test")[1]).tolist() == [2, 2, 2]
    np.testing.assert_array_equal(small.arrays("train")[0], full.arrays("train")[0])


def test_a_natural_partition_gives_each_key_its_client(tiny_bert_dir: Path, tmp_path: Path) -> None:
    # Prepare: 60 texts of three users with 30, 20 and 10 texts
    from autorank.config import PartitionConfig
    from autorank.data.federation import build_federation

    texts, labels = tiny_text_corpus(60)
    users = ["cat"] * 30 + ["ann"] * 20 + ["bob"] * 10
    rows = [f'"{t}",{y},{u}' for t, y, u in zip(texts, labels, users, strict=True)]
    file = tmp_path / "d.csv"
    file.write_text("\n".join(["text,label,user", *rows]) + "\n")
    options = _options(tiny_bert_dir, tmp_path, key_column="user")

    # Execute
    data = load_data("text", path=file, seed=0, text=options)
    settings = PartitionConfig(scheme="natural", n_clients=3, local_test_fraction=0.0)
    federation = build_federation(data, settings, public_fraction=0.0, seed=0)
    wrong = PartitionConfig(scheme="natural", n_clients=4)

    # Assert: clients in sorted key order, each holding exactly its user's training texts
    assert data.keys is not None and len(data.keys) == 48
    sizes = [len(c.train) for c in federation.clients]
    assert sizes == [data.keys.count(u) for u in ("ann", "bob", "cat")]
    for client, user in zip(federation.clients, ("ann", "bob", "cat"), strict=True):
        assert {data.keys[i] for i in client.train} == {user}
    with pytest.raises(ValueError, match=r"n_clients \(4\) must equal the 3 distinct values"):
        build_federation(data, wrong, public_fraction=0.0, seed=0)


def test_text_data_without_a_tokenizer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is text; expected the model's tokenizer"):
        load_data("text", path=tmp_path / "d.csv")
