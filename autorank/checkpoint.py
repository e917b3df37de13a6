"""Atomic per-round checkpoints, stored with safetensors and JSON (never pickle).

Layout under ``<root>/<run_id>/``::

    base-<digest>.safetensors      base weights, named by their content
    round_0007/state.safetensors   the global adapter
    round_0007/meta.json           round, run id, config digest, base file, ranks, metrics,
                                   the round's sampled clients
    LATEST                         name of the newest complete round folder

Clients keep no state of their own between rounds (each sampled client downloads the global
adapter at its ranks, see ``autorank.rounds``), so a checkpoint does not grow with the number of
clients. Formats 1 and 2 also stored every client's download; they still load.

The base is frozen except under FLoRA, which merges each round's update into it, so it is written
once and shared by the rounds that used it instead of being copied into every round (a large
transformers base would otherwise dominate the checkpoint I/O). Every file is written under a
temporary name and renamed into place, the base before the round that names it, then ``LATEST`` is
replaced atomically, so a crash at any moment leaves the previous round intact: a run loses at
most the round in flight. No RNG state needs saving: every random stream is derived from
``(seed, round, client)`` (see ``autorank.training.client_seed``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from autorank.adapters import AdapterState, LoraFactors

FORMAT_VERSION = 3
_READABLE = {1, 2, 3}  # 1 kept the base inside each round's state; 1 and 2 kept client states
_KEEP = 2


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or written for another experiment."""


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to continue a run after round ``round_idx``.

    Attributes:
        round_idx: the last completed round (1-based).
        run_id: the tracking run the checkpoint belongs to.
        config_digest: digest of the experiment config that produced it.
        base: frozen base weights (they change under FLoRA merging).
        global_state: the server's adapter.
        fresh: the last update was merged into the base (FLoRA): clients start fresh adapters.
        meta: JSON-ready extras (ranks, the rank decision, the round's metrics, ...).
    """

    round_idx: int
    run_id: str
    config_digest: str
    base: Mapping[str, torch.Tensor]
    global_state: AdapterState
    fresh: bool = False
    meta: Mapping[str, Any] = field(default_factory=dict)


def state_tensors(prefix: str, state: AdapterState) -> dict[str, torch.Tensor]:
    """Flatten an adapter state into named tensors (``prefix/lora/<layer>/A`` ...)."""
    out: dict[str, torch.Tensor] = {}
    for layer, f in state.lora.items():
        out[f"{prefix}/lora/{layer}/A"] = f.A.detach().cpu().clone().contiguous()
        out[f"{prefix}/lora/{layer}/B"] = f.B.detach().cpu().clone().contiguous()
        out[f"{prefix}/lora/{layer}/scale"] = torch.tensor(f.scale, dtype=torch.float64)
    for name, t in state.extra.items():
        out[f"{prefix}/extra/{name}"] = t.detach().cpu().clone().contiguous()
    return out


def state_from_tensors(prefix: str, tensors: Mapping[str, torch.Tensor]) -> AdapterState:
    """Rebuild the adapter state written by ``state_tensors`` under ``prefix``."""
    lora_parts: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        head, _, rest = key.partition("/")
        if head != prefix:
            continue
        kind, _, name = rest.partition("/")
        if kind == "extra":
            extra[name] = t
        elif kind == "lora":
            layer, _, part = name.rpartition("/")
            lora_parts.setdefault(layer, {})[part] = t
    lora = {}
    for layer, parts in lora_parts.items():
        if set(parts) != {"A", "B", "scale"}:
            raise CheckpointError(
                f"adapter {prefix!r} layer {layer!r} is incomplete: {sorted(parts)}"
            )
        lora[layer] = LoraFactors(parts["A"], parts["B"], float(parts["scale"]))
    return AdapterState(lora, extra)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def base_digest(base: Mapping[str, torch.Tensor]) -> str:
    """A digest of the base weights' names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(base):
        t = base[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _write_base(run_dir: Path, base: Mapping[str, torch.Tensor]) -> str:
    """Write the base weights unless a file with the same content is already there."""
    name = f"base-{base_digest(base)}.safetensors"
    if not (run_dir / name).is_file():
        fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{name}.")
        os.close(fd)
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in base.items()}, tmp)
        os.replace(tmp, run_dir / name)
    return name


def _prune(run_dir: Path) -> None:
    """Keep the newest rounds and the base files they name; remove the rest."""
    for old in sorted(run_dir.glob("round_*"))[:-_KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    named = set()
    for folder in run_dir.glob("round_*"):
        try:
            named.add(json.loads((folder / "meta.json").read_text()).get("base_file"))
        except (OSError, json.JSONDecodeError):
            return  # leave every base file while a round folder is unreadable
    for base_file in run_dir.glob("base-*.safetensors"):
        if base_file.name not in named:
            base_file.unlink(missing_ok=True)


def save_checkpoint(root: Path, ckpt: Checkpoint) -> Path:
    """Write a round's checkpoint atomically and prune all but the newest two.

    Returns:
        The round folder written.
    """
    run_dir = root / ckpt.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"round_{ckpt.round_idx:04d}"
    base_file = _write_base(run_dir, ckpt.base)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".incomplete-"))
    save_file(state_tensors("global", ckpt.global_state), str(tmp / "state.safetensors"))
    meta = {
        "format": FORMAT_VERSION,
        "round": ckpt.round_idx,
        "run_id": ckpt.run_id,
        "config_digest": ckpt.config_digest,
        "fresh_adapters": ckpt.fresh,
        "base_file": base_file,
        **ckpt.meta,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(run_dir / "LATEST", final.name)
    _prune(run_dir)
    return final


def latest_round_dir(root: Path, run_id: str) -> Path | None:
    """The newest complete round folder of a run, or None if the run has no checkpoint yet."""
    pointer = root / run_id / "LATEST"
    if not pointer.is_file():
        return None
    folder = root / run_id / pointer.read_text().strip()
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint pointer {str(pointer)!r} names a missing folder")
    return folder


def _read_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} has an unreadable meta.json: {err}"
        ) from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found not in _READABLE:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} has format {found}, expected one of {sorted(_READABLE)}"
        )
    return meta


def _load_tensors(path: Path, folder: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint {str(folder)!r} is corrupt: {err}") from None


def load_checkpoint(root: Path, run_id: str, *, config_digest: str) -> Checkpoint | None:
    """Load a run's newest checkpoint, refusing one that is corrupt or from another config.

    Returns:
        The checkpoint, or None when the run has none yet.
    """
    folder = latest_round_dir(root, run_id)
    if folder is None:
        return None
    meta = _read_meta(folder)
    if meta.get("run_id") != run_id:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} belongs to run {meta.get('run_id')!r}, not {run_id!r}"
        )
    if meta.get("config_digest") != config_digest:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} was written for another config "
            f"(digest {meta.get('config_digest')}, this run's is {config_digest})"
        )
    tensors = _load_tensors(folder / "state.safetensors", folder)
    if "base_file" in meta:
        base = _load_tensors(folder.parent / str(meta["base_file"]), folder)
    else:
        base = {k.removeprefix("base/"): v for k, v in tensors.items() if k.startswith("base/")}
    if "fresh_adapters" in meta:
        fresh = bool(meta["fresh_adapters"])
    else:  # formats 1 and 2: clients downloaded empty LoRA factors after a merge
        fresh = not any(k.startswith("client0/lora/") for k in tensors)
    own = {"format", "round", "run_id", "config_digest", "n_clients", "base_file", "fresh_adapters"}
    extras = {k: v for k, v in meta.items() if k not in own}
    return Checkpoint(
        round_idx=int(meta["round"]),
        run_id=run_id,
        config_digest=config_digest,
        base=base,
        global_state=state_from_tensors("global", tensors),
        fresh=fresh,
        meta=extras,
    )


def save_adapter(path: Path, state: AdapterState, metadata: Mapping[str, str]) -> None:
    """Write one adapter state (LoRA factors, scales, head) as a standalone safetensors file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_tensors("adapter", state), str(path), metadata=dict(metadata))


def load_adapter(path: Path) -> AdapterState:
    """Read an adapter written by ``save_adapter``."""
    try:
        return state_from_tensors("adapter", load_file(str(path)))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"adapter file {str(path)!r} is unreadable: {err}") from None


DECISION_FILE = "rank_decision.json"


def save_decision(root: Path, run_id: str, decision: Mapping[str, Any]) -> None:
    """Write the run's rank decision once, beside its rounds (it does not change per round)."""
    run_dir = root / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(run_dir / DECISION_FILE, json.dumps(decision))


def load_decision(root: Path, ckpt: Checkpoint) -> Mapping[str, Any]:
    """The run's rank decision: its own file, or (formats 1-2) the checkpoint's meta.

    Raises:
        CheckpointError: neither holds a readable decision.
    """
    path = root / ckpt.run_id / DECISION_FILE
    if path.is_file():
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"rank decision {str(path)!r} is unreadable: {err}") from None
    if "rank_decision" in ckpt.meta:
        return dict(ckpt.meta["rank_decision"])
    raise CheckpointError(f"run {ckpt.run_id} has no rank decision ({str(path)!r} is missing)")
