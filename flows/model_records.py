"""What a run leaves for the users of its model, in the layouts they expect.

At the start, the data set: both splits as MLflow dataset inputs, the partition as the training
split's input tags and ``data/partition.json``. At the end, under ``adapter/``: the global adapter
(the project's own file and peft's layout), each client's adapter in peft's layout (up to
``tracking.keyed_clients_max`` clients) and the final base; and the MLflow model ``model``
(``runs:/<run id>/model``), registered when ``tracking.register_as`` names it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from autorank.config import ExperimentConfig, config_digest
from autorank.config.vocab import TEXT_MODELS
from autorank.data.datasets import DatasetSplits
from autorank.data.federation import Federation, partition_params
from autorank.data.text import TextEncoder
from autorank.lora.adapters import AdapterState
from autorank.lora.export import merged_away, peft_layout, relative_to
from autorank.lora.files import save_adapter
from autorank.models.zoo import head_modules, save_base_weights
from autorank.recipe import lora_settings, text_options
from autorank.rounds.steps import download
from autorank.serving import ModelSpec
from tasks import model_tracking, tracking
from tasks.model_tracking import DataInput

PARTITION_FILE = "data/partition.json"
_EXAMPLE_ROWS = 5


@dataclass(frozen=True)
class FinalModel:
    """The model a run ends with.

    Attributes:
        base: the final base (FLoRA's merges included).
        global_state: the global adapter.
        merged: its last update is already inside ``base`` (FLoRA), so it adds only the head.
        paths: each client's module path -> rank.
    """

    base: nn.Module
    global_state: AdapterState
    merged: bool
    paths: Sequence[Mapping[str, int]]


def bounded_layout(layout: Mapping[str, Any], keyed_max: int) -> dict[str, Any]:
    """The layout as logged: one row per client up to ``keyed_max`` clients; beyond, the
    spread of their sizes instead (the digest still binds every client's samples, and the
    config and seed give them again)."""
    clients = layout["clients"]
    if len(clients) <= keyed_max:
        return dict(layout)
    spread = {}
    for part in ("train", "local_test"):
        sizes = np.array([c[part] for c in clients])
        spread[part] = {
            "total": int(sizes.sum()),
            "min": int(sizes.min()),
            "median": float(np.median(sizes)),
            "max": int(sizes.max()),
        }
    rest = {k: v for k, v in layout.items() if k != "clients"}
    return {**rest, "n_clients": len(clients), "client_sizes": spread}


def _partition_tags(config: ExperimentConfig, layout: Mapping[str, Any]) -> dict[str, str]:
    """The training split's input tags: scheme, its parameters, sizes, the layout's digest."""
    clients = layout["clients"]
    tags = {
        "partition.scheme": config.partition.scheme,
        "partition.n_clients": str(len(clients)),
        "partition.public_samples": str(layout["public"]),
        "partition.digest": str(layout["digest"]),
        "partition.file": PARTITION_FILE,
    }
    tags |= {f"partition.{k}": str(v) for k, v in partition_params(config.partition).items()}
    if len(clients) <= config.tracking.keyed_clients_max:
        tags["partition.client_sizes"] = ",".join(str(c["train"]) for c in clients)
    return tags


def record_data(config: ExperimentConfig, run_id: str, federation: Federation) -> None:
    """The data set's splits as the run's dataset inputs (once), and its partition."""
    uri, data = config.tracking.uri, federation.data
    layout = federation.layout()
    tracking.log_json(
        uri, run_id, bounded_layout(layout, config.tracking.keyed_clients_max), PARTITION_FILE
    )
    source = {"autorank.data.name": config.data.name}
    if config.data.path is not None:
        source["autorank.data.path"] = str(config.data.path)
    inputs = []
    for split in ("train", "test"):
        x, y = data.arrays(split)
        tags = _partition_tags(config, layout) if split == "train" else {}
        name = f"{config.data.name}/{split}"
        inputs.append(DataInput(name, split, x, y, data.digest(split), tags, source))
    model_tracking.track_data_inputs(uri, run_id, inputs)


def _spec(config: ExperimentConfig, data: DatasetSplits, *, base_file: bool) -> ModelSpec:
    return ModelSpec(
        name=config.model.name,
        input_shape=data.input_shape,
        n_classes=data.n_classes,
        hidden=config.model.hidden,
        head=head_modules(config.model.name),
        hf_name_or_path=config.model.hf_name_or_path,
        label_names=data.label_names,
        base_file=base_file,
    )


def _pretrained_base(config: ExperimentConfig) -> bool:
    """Whether the final base is a packaged or local text model as it was loaded (no merge wrote
    into it): served from there, not copied into every run (hundreds of MB)."""
    return (
        config.model.name in TEXT_MODELS
        and config.model.init == "random"
        and not config.aggregation.updates_base
    )


def _peft_root(base: nn.Module, state: AdapterState, text: bool) -> tuple[nn.Module, AdapterState]:
    """For a text model, the transformers model inside the wrapper and the state's paths
    relative to it: ``PeftModel.from_pretrained`` then takes the pretrained model as loaded
    from its folder or package."""
    if not text:
        return base, state
    return base.get_submodule("model"), relative_to(state, "model.")


def write_adapters(
    root: Path, config: ExperimentConfig, final: FinalModel, data: DatasetSplits
) -> dict[str, Path]:
    """Write the run's ``adapter/`` folder under ``root``; returns the MLflow model's files.

    ``adapter/``: ``global_adapter.safetensors`` (the project's layout), ``peft/`` (the global
    adapter in peft's layout), ``clients/cNN/`` (each client's download, the global adapter cut
    to its ranks, in peft's layout), ``base/model.safetensors`` and ``base/model.json``. Under
    FLoRA the update is inside the base: the peft adapter and the served one
    (``root/served_adapter.safetensors``) have ``B = 0`` and there are no client adapters.
    """
    lora, state, folder = lora_settings(config), final.global_state, root / "adapter"
    hf_name = config.model.hf_name_or_path
    meta = {"ranks": str(state.ranks()), "config_digest": config_digest(config)}
    served = folder / "global_adapter.safetensors"
    save_adapter(served, state, meta)
    if final.merged:
        state = merged_away(state)
        served = root / "served_adapter.safetensors"
        save_adapter(served, state, meta)
    text = config.model.name in TEXT_MODELS
    module, rooted = _peft_root(final.base, state, text)
    peft_layout(module, rooted, lora, base_name_or_path=hf_name).save(folder / "peft")
    if not final.merged and len(final.paths) <= config.tracking.keyed_clients_max:
        for client, own in enumerate(final.paths):
            module, mine = _peft_root(final.base, download(state, own, lora), text)
            adapter = peft_layout(module, mine, lora, base_name_or_path=hf_name)
            adapter.save(folder / "clients" / f"c{client:02d}")
    files = {"spec": folder / "base" / "model.json", "adapter": served}
    base_file = not _pretrained_base(config)
    if base_file:
        files["base"] = folder / "base" / "model.safetensors"
        save_base_weights(final.base, files["base"])
    files["spec"].parent.mkdir(parents=True, exist_ok=True)
    files["spec"].write_text(_spec(config, data, base_file=base_file).to_json())
    return files


def record_model(
    config: ExperimentConfig, run_id: str, final: FinalModel, data: DatasetSplits, step: int
) -> None:
    """Log ``adapter/`` and, with ``tracking.log_model``, the MLflow model (registered under
    ``tracking.register_as``)."""
    uri = config.tracking.uri
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = write_adapters(Path(tmp), config, final, data)
        tracking.track_file(uri, run_id, Path(tmp) / "adapter")  # a folder: adapter/...
        if not config.tracking.log_model:
            return
        x, _ = data.arrays("test")
        example: Any = x[:_EXAMPLE_ROWS].reshape(min(len(x), _EXAMPLE_ROWS), -1)
        options = text_options(config)
        generates = config.model.name == "causal_lm"
        if generates:  # prompts in, their continuations out
            example = pd.DataFrame({"text": list(config.tracking.prompts)})
        elif options is not None:  # raw strings in: a few test samples, decoded
            texts = TextEncoder(options.tokenizer, options.max_length).decode(x[:_EXAMPLE_ROWS])
            example = pd.DataFrame({"text": texts})
        model_tracking.track_model(
            uri,
            run_id,
            artifacts,
            example,
            step=step,
            register_as=config.tracking.register_as,
            generates=generates,
        )
