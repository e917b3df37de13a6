"""AutoRank: automatic per-client LoRA rank personalization for federated learning.

The pure library, one package per stage of the pipeline (it never imports Prefect, MLflow,
``tasks`` or ``flows``):

- ``config``: the settings, one validated ``ExperimentConfig``;
- ``data``: data sets, partition schemes and the federation's layout;
- ``ranking``: profiling, CRITIC weights, TOPSIS closeness and the rank assigners;
- ``models`` and ``lora``: the base models and everything about adapters;
- ``engine``: local training, the sequential and batched engines;
- ``merge``: the server's aggregators;
- ``rounds``: sampling, one round's steps, checkpoints;
- ``reporting``: comparison grids, summaries, paired tests, plots;
- ``recipe``: a config turned into the objects above; ``serving``: a logged model from its files.

``docs/architecture.md`` maps every module.
"""

__version__ = "0.1.0"

__all__ = [
    "config",
    "data",
    "engine",
    "lora",
    "merge",
    "models",
    "ranking",
    "recipe",
    "reporting",
    "rounds",
    "serving",
]
