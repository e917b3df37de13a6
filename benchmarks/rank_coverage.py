"""Which clients write each band of components of RBLA's global adapter, for a finished run.

RBLA averages component k of a layer over the clients whose rank covers k (arXiv 2408.08699), so
the components above the smallest rank are written by fewer and fewer clients. This prints, for
each band between consecutive ranks, how many clients write it, their share of the training
samples, how many classes they hold, and how far their pooled labels are from the test set's
(total variation distance). Measured figures only, nothing asserted:

    .venv/bin/python benchmarks/rank_coverage.py RUN_ID [--uri sqlite:///mlruns/mlflow.db]
        [--layer fc1]

The run's own `config.yaml` and `rank_decision.json` artifacts are read back, and its partition
is rebuilt from the config (partitions are deterministic in the seed).
"""

from __future__ import annotations

import argparse

import numpy as np
import yaml

from autorank.config import TrackingConfig, parse_config
from autorank.recipe import federation_for
from tasks import tracking


def bands(histogram: np.ndarray, test_labels: np.ndarray, ranks: list[int]) -> list[str]:
    """One line per band of components ``(previous rank, rank]``.

    Args:
        histogram: training label counts, ``[n_clients, n_classes]``.
        test_labels: the global test labels, ``[n_test]``.
        ranks: each client's rank for the layer, ``[n_clients]``.
    """
    n_classes = histogram.shape[1]
    test = np.bincount(test_labels, minlength=n_classes) / len(test_labels)
    total = histogram.sum()
    lines, low = [], 0
    for rank in sorted(set(ranks)):
        writers = [i for i, r in enumerate(ranks) if r >= rank]
        pooled = histogram[writers].sum(axis=0)
        share = pooled.sum() / total
        held = int((pooled > 0).sum())
        tvd = 0.5 * np.abs(pooled / pooled.sum() - test).sum()
        lines.append(
            f"components {low + 1:>4}-{rank:<4} {len(writers):>2} clients "
            f"{share:6.1%} of samples  {held:>2}/{n_classes} classes  TVD to test labels {tvd:.2f}"
        )
        low = rank
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_id")
    parser.add_argument("--uri", default=TrackingConfig().uri)
    parser.add_argument("--layer", default="fc1")
    args = parser.parse_args()

    config = parse_config(yaml.safe_load(tracking.read_text(args.uri, args.run_id, "config.yaml")))
    decision = tracking.read_json(args.uri, args.run_id, "rank_decision.json")
    ranks = [int(client["layer_ranks"][args.layer]) for client in decision["clients"]]
    federation = federation_for(config)
    _, test_labels = federation.data.arrays("test")
    print(
        f"run {args.run_id}: {config.data.name}, {config.partition.scheme}"
        f"{f' alpha={config.partition.alpha}' if config.partition.scheme == 'dirichlet' else ''}, "
        f"seed {config.seed}, {config.ranking.assigner} ranks for {args.layer}: {ranks}"
    )
    for line in bands(federation.histogram, test_labels, ranks):
        print(" ", line)


if __name__ == "__main__":
    main()
