"""Measure the quickstart experiment from Python, and centralised training for reference.

Prints measured figures only (nothing asserted):

    .venv/bin/python benchmarks/digits_reference.py [--set key=value ...]

The overrides are those of `autorank run`. Centralised training runs as many epochs as the
federation runs rounds.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch

from autorank.config import ExperimentConfig, load_config
from autorank.engine.local import pretrain
from autorank.models.evaluation import evaluate
from autorank.models.zoo import build_model
from autorank.recipe import federation_for


def centralised(config: ExperimentConfig) -> tuple[float, float, float]:
    """Full training of the same model on all training data (every client's samples, pooled)."""
    federation = federation_for(config)
    x, y = (torch.from_numpy(a) for a in federation.data.arrays("train"))
    xt, yt = (torch.from_numpy(a) for a in federation.data.arrays("test"))
    model = build_model(
        config.model.name,
        input_shape=federation.data.input_shape,
        n_classes=federation.data.n_classes,
        hidden=config.model.hidden,
        seed=config.seed,
    )
    start = time.perf_counter()
    epochs = config.training.rounds
    best = 0.0
    for epoch in range(epochs):
        pretrain(model, x, y, epochs=1, lr=config.training.lr, batch_size=64, seed=epoch)
        best = max(best, evaluate(model, xt, yt, device=torch.device("cpu")).accuracy)
    final = evaluate(model, xt, yt, device=torch.device("cpu")).accuracy
    return final, best, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="autorank-bench-")
    config = load_config(
        None,
        [
            f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            f"runtime.checkpoint_dir={tmp}/ckpt",
            *args.overrides,
        ],
    )
    os.environ.setdefault("PREFECT_HOME", f"{tmp}/prefect")
    from flows.local import configure_logging

    configure_logging(verbose=False)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, cuda={torch.cuda.is_available()}"
    )
    start = time.perf_counter()
    from flows.experiment import federated_training

    run_id = federated_training(config=config)
    wall = time.perf_counter() - start
    from mlflow.tracking import MlflowClient

    history = MlflowClient(config.tracking.uri).get_metric_history(run_id, "global/accuracy")
    accs = [m.value for m in sorted(history, key=lambda m: m.step)]
    first85 = next((i + 1 for i, a in enumerate(accs) if a >= 0.85), None)
    print(
        f"federated ({config.ranking.assigner}, {config.aggregation.label}, "
        f"{config.partition.n_clients} clients, {config.training.rounds} rounds): "
        f"final {accs[-1]:.4f}, best {max(accs):.4f}, first round >= 0.85: {first85}, "
        f"wall {wall:.1f} s including Prefect start"
    )
    final, best, seconds = centralised(config)
    print(
        f"centralised (same model, all parameters, pooled data): final {final:.4f}, "
        f"best {best:.4f}, {seconds:.1f} s"
    )


if __name__ == "__main__":
    main()
