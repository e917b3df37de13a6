"""Text sources and tokenisation, on small files written here and a tiny tokenizer."""

from __future__ import annotations

import json
import shutil
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


# --- a causal LM's data: token blocks, natural clients, held-out clients ----------------------


def _lm_file(tmp_path: Path) -> Path:
    """Four books of 40, 25, 12 and 9 words (the tiny tokenizer: a token per word)."""
    words = iter(TEXT_WORDS * 20)
    rows = ["text,book"]
    for book, n in (("gen", 40), ("exo", 25), ("ruth", 12), ("jude", 9)):
        rows.append(f'"{" ".join(next(words) for _ in range(n))}",{book}')
    file = tmp_path / "books.csv"
    file.write_text("\n".join(rows) + "\n")
    return file


def _lm_options(folder: Path, tmp_path: Path, **kw: object) -> TextOptions:
    return _options(folder, tmp_path, key_column="book", blocks=True, **kw)


def test_a_causal_lm_s_texts_are_cut_into_blocks_of_their_book(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from autorank.data.text import token_blocks

    # Prepare: 19 tokens -> blocks of 8, 8 and 3; 17 -> 8, 8 (the lone 17th token is dropped)
    texts = [" ".join(TEXT_WORDS[:19]), " ".join(TEXT_WORDS[:17])]

    # Execute
    x, origin = token_blocks(texts, _lm_options(tiny_llama_dir, tmp_path))

    # Assert
    assert x.shape == (5, 2, 8) and origin.tolist() == [0, 0, 0, 1, 1]
    assert x[:, 1].sum(axis=1).tolist() == [8, 8, 3, 8, 8]
    from transformers import AutoTokenizer

    whole = AutoTokenizer.from_pretrained(str(tiny_llama_dir))(texts[0], add_special_tokens=False)
    assert x[:3, 0].reshape(-1)[:19].tolist() == whole["input_ids"]
    assert (x[2, 1, 3:] == 0).all()  # the last block's padding is masked


def test_held_out_books_are_the_test_split_and_the_rest_train(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    # Prepare
    options = _lm_options(tiny_llama_dir, tmp_path, test_keys=("jude",))

    # Execute
    data = load_data("text", path=_lm_file(tmp_path), seed=0, text=options)

    # Assert: 40, 25, 12 train tokens -> 5 + 3 + 2 blocks (a lone last token is dropped);
    # jude's 9 -> 1 block, testing
    assert data.language_model and data.n_classes == 1 and data.label_names == ("text",)
    assert data.keys is not None and sorted(set(data.keys)) == ["exo", "gen", "ruth"]
    assert [data.keys.count(b) for b in ("gen", "exo", "ruth")] == [5, 3, 2]
    x_test, y_test = data.arrays("test")
    assert len(x_test) == 1 and not y_test.any()


def test_train_keys_keep_some_books_and_unknown_books_are_named(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    file = _lm_file(tmp_path)
    kept = _lm_options(tiny_llama_dir, tmp_path, train_keys=("ruth",), test_keys=("jude",))
    unknown = _lm_options(tiny_llama_dir, tmp_path, test_keys=("job",))
    everything = _lm_options(tiny_llama_dir, tmp_path, train_keys=("ruth",), test_keys=("ruth",))

    data = load_data("text", path=file, seed=0, text=kept)

    assert data.keys == ("ruth", "ruth")
    with pytest.raises(TextDataError, match=r"data.test_keys \['job'\] are not clients; .*gen"):
        load_data("text", path=file, seed=0, text=unknown)
    with pytest.raises(ValueError, match="hold every sample"):
        load_data("text", path=file, seed=0, text=everything)


def test_a_causal_lm_s_clients_are_profiled_by_their_tokens(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from autorank.config import PartitionConfig
    from autorank.data.federation import build_federation
    from autorank.ranking.profiling import gini_simpson, label_entropy, profile_clients

    # Prepare
    data = load_data(
        "text", path=_lm_file(tmp_path), seed=0, text=_lm_options(tiny_llama_dir, tmp_path)
    )
    settings = PartitionConfig(scheme="natural", n_clients=4, local_test_fraction=0.0)

    # Execute
    federation = build_federation(data, settings, public_fraction=0.0, seed=0)
    profiles = profile_clients(federation.histogram, tokens=federation.tokens)

    # Assert: each client's counts are its blocks' real tokens; the criteria are theirs
    x, _ = data.arrays("train")
    assert federation.tokens is not None
    for client, row in zip(federation.clients, federation.tokens, strict=True):
        ids = x[client.train, 0][x[client.train, 1] > 0]
        assert row.sum() == len(ids) and row[ids[0]] == (ids == ids[0]).sum()
    assert [p.entropy for p in profiles] == pytest.approx(label_entropy(federation.tokens))
    assert [p.gini_simpson for p in profiles] == pytest.approx(gini_simpson(federation.tokens))
    assert [p.n_samples for p in profiles] == [len(c.train) for c in federation.clients]
    assert len({round(p.entropy, 6) for p in profiles}) > 1  # not the one label's zero


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian's bible-kjv is not installed")
def test_the_king_james_bible_is_66_books_keyed_by_name(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from autorank.data.text import read_kjv

    table = read_kjv(None, _lm_options(tiny_llama_dir, tmp_path))

    assert table.keys is not None and len(table.keys) == 66
    assert table.keys[0] == "Ge" and table.keys[-1] == "Rev" and "Ruth" in table.keys
    assert table.texts[0].startswith("In the beginning God created the heaven and the earth.")
    assert table.label_names == ("text",) and not table.labels.any()


def test_fortunes_are_labelled_and_keyed_by_their_file(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from autorank.data.text import read_fortunes

    # Prepare: two fortune files with their .dat indexes, and a stray file without one
    (tmp_path / "law").write_text("A lawyer.\n%\nA judge,\nin two lines.\n%\n")
    (tmp_path / "pets").write_text("A cat.\n%\n")
    for name in ("law", "pets"):
        (tmp_path / f"{name}.dat").write_bytes(b"\x00")
    (tmp_path / "notes.txt").write_text("not a fortune file")

    # Execute
    table = read_fortunes(tmp_path, _options(tiny_bert_dir, tmp_path))

    # Assert
    assert table.texts == ["A lawyer.", "A judge,\nin two lines.", "A cat."]
    assert table.label_names == ("law", "pets") and table.labels.tolist() == [0, 0, 1]
    assert table.keys is not None and table.keys.tolist() == ["law", "law", "pets"]
    with pytest.raises(TextDataError, match=r"no fortune files in .*apt-get install fortunes"):
        read_fortunes(tmp_path / "empty", _options(tiny_bert_dir, tmp_path))
