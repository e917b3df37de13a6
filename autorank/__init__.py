"""AutoRank: automatic per-client LoRA rank personalization for federated learning.

The pure library: data, partitioning, profiling, MCDA, rank assignment, models, LoRA, training,
aggregation and checkpoints. It never imports Prefect or MLflow.
"""

__version__ = "0.1.0"
