"""Text baselines beside a federated run: TF-IDF + logistic regression on the clients' pooled
training data, a centralised LoRA fine-tune and local-only training, on the run's test split.

Prints measured figures only (nothing asserted):

    .venv/bin/python benchmarks/text_baselines.py [--config configs/text_sentiment.yaml]
        [--grid configs/grids/text_sentiment.yaml] [--seeds 0 1 2] [--no-lora]
        [--set key=value ...]

The data, partition and test split are the run's (``autorank.recipe.federation_for``); with
``--grid`` the grid's ``base`` and seeds. The pooled data is every client's training share (its
local test share and the server's share left out).

- **TF-IDF + LR**: the texts as the model sees them (its tokens, decoded: truncated to
  ``data.max_length``, lower-cased by MiniLM's tokenizer); word 1-2-grams, sublinear TF, lbfgs
  logistic regression; on all the pooled texts, and on a random subset of as many texts as the
  federated run's local steps draw (``rounds x clients_per_round x local_steps x batch_size``),
  so that the two are also compared at the same number of texts seen.
- **Centralised LoRA**: one adapter at rank ``--rank`` (alpha ``2r``, on the model's default
  targets, its head trained) on the pooled data for as many steps as the federated run takes in
  total (``rounds x clients_per_round x local_steps``), with its optimiser, learning rate and
  batch size: the same compute, without the federation.
- **Local-only**: every client trains its own adapter (same settings) on its own data alone, for
  its share of those steps (total / n_clients); the table gives the mean and spread of the
  clients' test accuracies (what FedLLM-Bench reports as local training).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from autorank.config import ExperimentConfig, load_config
from autorank.data.text import TextEncoder
from autorank.engine.jobs import ClientJob
from autorank.engine.local import client_seed
from autorank.engine.sequential import SequentialBackend
from autorank.lora.functional import LoraTemplate, evaluate_state
from autorank.lora.settings import LoraSettings
from autorank.models.zoo import default_targets, head_modules
from autorank.recipe import federation_for, make_base, text_options, train_settings
from autorank.reporting.grid import load_grid
from autorank.rounds.steps import client_data, test_data

CPU = torch.device("cpu")


def tfidf(config: ExperimentConfig, seen: int) -> dict[str, float]:
    """TF-IDF + LR on all pooled texts and on ``seen`` of them; the majority class."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    options = text_options(config)
    assert options is not None
    federation = federation_for(config)
    encoder = TextEncoder(options.tokenizer, options.max_length)
    clients = client_data(federation)
    texts = encoder.decode(np.concatenate([c.x.numpy() for c in clients]))
    y_train = np.concatenate([c.y.numpy() for c in clients])
    x_test, y_test = (t.numpy() for t in test_data(federation))
    test_texts = encoder.decode(x_test)
    out = {"n_train": float(len(y_train)), "n_test": float(len(y_test))}
    rng = np.random.default_rng(config.seed)
    subset = np.sort(rng.choice(len(texts), size=min(seen, len(texts)), replace=False))
    for name, rows in (("tfidf_all", np.arange(len(texts))), ("tfidf_seen", subset)):
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
        features = vectorizer.fit_transform([texts[i] for i in rows])
        model = LogisticRegression(max_iter=2000).fit(features, y_train[rows])
        predicted = model.predict(vectorizer.transform(test_texts))
        out[name] = float((predicted == y_test).mean())
    out["majority"] = float((y_test == np.bincount(y_train).argmax()).mean())
    return out


def lora_baselines(config: ExperimentConfig, rank: int) -> dict[str, float]:
    """Centralised LoRA at the federated run's total steps; local-only at each client's share."""
    federation = federation_for(config)
    t = config.training
    assert t.local_steps is not None and isinstance(t.clients_per_round, int)
    total = t.rounds * t.clients_per_round * t.local_steps
    base = make_base(
        config.model, federation.data, federation.public, lr=t.lr, batch_size=t.batch_size,
        seed=config.seed,
    ).requires_grad_(False)  # fmt: skip
    head = head_modules(config.model.name)
    targets = default_targets(config.model.name, hf_name_or_path=config.model.hf_name_or_path)
    lora = LoraSettings("proportional", 2.0 * rank, 2.0, 0.0, head)
    engine = SequentialBackend(base, lora, train_settings(config), CPU)
    template = LoraTemplate(base, targets, head, CPU)
    x_test, y_test = test_data(federation)
    clients = client_data(federation)
    ranks = dict.fromkeys(targets, rank)
    pooled = ClientJob(
        0, ranks, None, torch.cat([c.x for c in clients]), torch.cat([c.y for c in clients]),
        1, client_seed(config.seed, 1, 0), total,
    )  # fmt: skip
    start = time.perf_counter()
    [central] = engine.train_clients([pooled])
    out = {"central": evaluate_state(template, central.result.state, x_test, y_test).accuracy}
    out["central_s"] = time.perf_counter() - start
    share = max(1, round(total / len(clients)))
    local = []
    for i, c in enumerate(clients):
        epochs = -(-share // max(1, -(-len(c.y) // t.batch_size)))  # enough epochs for the steps
        job = ClientJob(i, ranks, None, c.x, c.y, epochs, client_seed(config.seed, 1, i), None)
        [result] = engine.train_clients([_capped(job, share, t.batch_size)])
        local.append(evaluate_state(template, result.result.state, x_test, y_test).accuracy)
    out |= {"local_mean": float(np.mean(local)), "local_min": min(local), "local_max": max(local)}
    out["steps_total"], out["steps_local"] = float(total), float(share)
    return out


def _capped(job: ClientJob, steps: int, batch: int) -> ClientJob:
    """The job cut to ``steps`` steps: whole epochs where the client's data allows, else one
    epoch of at most ``steps`` batches."""
    per_epoch = -(-len(job.y) // batch)
    if steps <= per_epoch:
        return ClientJob(job.client, job.ranks, None, job.x, job.y, 1, job.seed, steps)
    return ClientJob(job.client, job.ranks, None, job.x, job.y, steps // per_epoch, job.seed, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/text_sentiment.yaml"))
    parser.add_argument("--grid", type=Path, default=None, help="use a grid's base and seeds")
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--rank", type=int, default=8, help="the LoRA baselines' rank (alpha 2r)")
    parser.add_argument("--no-lora", action="store_true", help="TF-IDF and majority only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.grid is not None:
        grid = load_grid(args.grid, [f"base.{o}" for o in args.overrides])
        config, seeds, source = grid.base, list(grid.seeds), str(args.grid)
    else:
        config = load_config(args.config, args.overrides)
        seeds, source = [config.seed], str(args.config)
    if text_options(config) is None:
        raise SystemExit(f"{source}: data.name {config.data.name!r} is not text")
    t = config.training
    seen = t.rounds * (t.clients_per_round or config.partition.n_clients) * (t.local_steps or 0)
    print(f"{source}: seeds {args.seeds or seeds}, texts the federated run's steps draw: "
          f"{seen * t.batch_size}")  # fmt: skip
    for seed in args.seeds or seeds:
        seeded = config.model_copy(update={"seed": seed})
        start = time.perf_counter()
        row = tfidf(seeded, int(seen * t.batch_size))
        if not args.no_lora:
            row |= lora_baselines(seeded, args.rank)
        counts = ("n_train", "n_test", "central_s", "steps_total", "steps_local")
        shown = "  ".join(f"{k} {v:.0f}" if k in counts else f"{k} {v:.4f}" for k, v in row.items())
        print(f"seed {seed}: {shown}  ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
