"""Tasks that lay out the experiment: data, partition, base model."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE
from torch import nn

from autorank.config import DataConfig, ModelConfig, PartitionConfig
from autorank.data.federation import Federation, federation_from_config
from autorank.data.text import TextOptions
from autorank.engine.jobs import limit_threads
from autorank.recipe import make_base


@task(cache_policy=NO_CACHE, persist_result=False)
def load_federation(
    data: DataConfig,
    partition: PartitionConfig,
    *,
    public_fraction: float,
    seed: int,
    text: TextOptions | None = None,
) -> Federation:
    """Load the dataset and partition it among the clients."""
    return federation_from_config(
        data, partition, public_fraction=public_fraction, seed=seed, text=text
    )


@task(cache_policy=NO_CACHE, persist_result=False)
def build_base(
    model: ModelConfig,
    federation: Federation,
    *,
    lr: float,
    batch_size: int,
    seed: int,
    threads: int,
) -> nn.Module:
    """Build the frozen base model (pre-trained on the server's public share if configured)."""
    limit_threads(threads)
    return make_base(
        model, federation.data, federation.public, lr=lr, batch_size=batch_size, seed=seed
    )
