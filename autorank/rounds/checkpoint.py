"""Atomic per-round checkpoints, stored with safetensors and JSON (never pickle).

Layout under ``<root>/<run_id>/``::

    base-<digest>.safetensors      base weights, named by their content
    round_0007/state.safetensors   the global adapter
    round_0007/meta.json           round, run id, config digest, base file, metrics, the
                                   round's sampled clients, the sha256 of every file it uses
    rank_decision.json             the ranks decided after the warm-up
    rank_decision_round_0010.json  the ranks decided again after round 10 (rerank_every)
    LATEST                         the newest complete round folder and the sha256 of its meta
    .lock                          held (flock) by the process running the run

A checkpoint proves what it is (format 4): its meta names its run, round (equal to its folder's)
and config digest and the sha256 of the state, base and rank-decision files (the decision the
next round trains under, named in its ``decision_file``), and ``LATEST`` the
sha256 of that meta. A file copied from another round or run, a symlink, or an edited meta is
refused with one line instead of resuming into wrong numbers.

Clients keep no state of their own between rounds (each sampled client downloads the global
adapter at its ranks, see ``autorank.rounds.steps``), so a checkpoint does not grow with the
number of clients. Formats 1 and 2 also stored every client's download; they still load.

The base is frozen except under FLoRA, which merges each round's update into it, so it is written
once and shared by the rounds that used it instead of being copied into every round (a large
transformers base would otherwise dominate the checkpoint I/O). Every file is written under a
temporary name and renamed into place, the base before the round that names it, then ``LATEST`` is
replaced atomically, so a crash at any moment leaves the previous round intact: a run loses at
most the round in flight. No RNG state needs saving: every random stream is derived from
``(seed, round, client)`` (see ``autorank.engine.local.client_seed``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from autorank.lora.adapters import AdapterState
from autorank.lora.files import CheckpointError, state_from_tensors, state_tensors

FORMAT_VERSION = 4
# 1 kept the base inside each round's state; 1 and 2 kept client states; 1-3 bound no file hashes
_READABLE = {1, 2, 3, 4}
_KEEP = 2
_ROUND = re.compile(r"round_(\d{4,})")
_DECISION = re.compile(r"rank_decision(_round_\d{4,})?\.json")
DECISION_FILE = "rank_decision.json"
_TEMPORARY = (".incomplete-", ".base-", ".LATEST.", ".rank_decision")


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


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, text.encode())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# sha256 of base files already written, by path (a run writes its base once, or once per merge)
_written_sha: dict[Path, str] = {}


def base_digest(base: Mapping[str, torch.Tensor]) -> str:
    """A digest of the base weights' names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(base):
        t = base[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _write_base(run_dir: Path, base: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """Write the base weights unless this run already wrote them; (file name, its sha256)."""
    name = f"base-{base_digest(base)}.safetensors"
    path = run_dir / name
    known = _written_sha.get(path)
    if known is None or not path.is_file():
        data = save({k: v.detach().cpu().contiguous() for k, v in base.items()})
        _atomic_write(path, data)
        known = _written_sha[path] = _sha256(data)
    return name, known


def _prune(run_dir: Path) -> None:
    """Keep the newest rounds and the base files they name; remove the rest, and what
    interrupted writes left (the run's lock keeps other writers out)."""
    for left in run_dir.iterdir():
        if left.name.startswith(_TEMPORARY):
            if left.is_dir() and not left.is_symlink():
                shutil.rmtree(left, ignore_errors=True)
            else:
                left.unlink(missing_ok=True)
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
    base_file, base_sha = _write_base(run_dir, ckpt.base)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".incomplete-"))
    state = save(state_tensors("global", ckpt.global_state))
    (tmp / "state.safetensors").write_bytes(state)
    files = {"state.safetensors": _sha256(state), f"../{base_file}": base_sha}
    decision_name = decision_file_of(ckpt)
    decision = run_dir / decision_name
    if decision.is_file():
        files[f"../{decision_name}"] = _file_sha256(decision)
    meta = {
        "format": FORMAT_VERSION,
        "round": ckpt.round_idx,
        "run_id": ckpt.run_id,
        "config_digest": ckpt.config_digest,
        "fresh_adapters": ckpt.fresh,
        "base_file": base_file,
        "sha256": files,
        **ckpt.meta,
    }
    text = json.dumps(meta, indent=1).encode()
    (tmp / "meta.json").write_bytes(text)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(run_dir / "LATEST", f"{final.name} sha256:{_sha256(text)}\n")
    _prune(run_dir)
    return final


def _pointer(root: Path, run_id: str) -> tuple[Path, int, str | None] | None:
    """``LATEST``: the newest round folder, its round, and the sha256 of its meta (None before
    format 4)."""
    pointer = root / run_id / "LATEST"
    if not pointer.is_file():
        return None
    name, _, sha = pointer.read_text().strip().partition(" ")
    folder = root / run_id / name
    numbered = _ROUND.fullmatch(name)
    if numbered is None or folder.is_symlink():
        raise CheckpointError(
            f"checkpoint pointer {str(pointer)!r} names {name!r}, expected a round folder"
        )
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint pointer {str(pointer)!r} names a missing folder")
    return folder, int(numbered.group(1)), sha.removeprefix("sha256:") or None


def latest_round_dir(root: Path, run_id: str) -> Path | None:
    """The newest complete round folder of a run, or None if the run has no checkpoint yet."""
    found = _pointer(root, run_id)
    return None if found is None else found[0]


def _read_meta(folder: Path, sha: str | None = None) -> dict[str, Any]:
    path = folder / "meta.json"
    try:
        if path.is_symlink():
            raise OSError("it is a symbolic link")
        data = path.read_bytes()
        meta = json.loads(data)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} has an unreadable meta.json: {err}"
        ) from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found not in _READABLE:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} has format {found}, expected one of {sorted(_READABLE)}"
        )
    if found >= 4 and sha != _sha256(data):
        raise CheckpointError(
            f"checkpoint {str(folder)!r}: meta.json does not match the sha256 in LATEST "
            "(edited after it was written?)"
        )
    return meta


def _verify_files(folder: Path, meta: Mapping[str, Any]) -> None:
    """Every file the round uses is a regular file with the sha256 its meta recorded."""
    if meta["format"] < 4:
        return
    files = meta.get("sha256")
    if not isinstance(files, dict) or "state.safetensors" not in files:
        raise CheckpointError(f"checkpoint {str(folder)!r} records no file hashes")
    for rel, expected in files.items():
        path = folder / rel
        if path.is_symlink() or not path.is_file():
            what = "a symbolic link" if path.is_symlink() else "missing"
            raise CheckpointError(f"checkpoint {str(folder)!r}: {rel} is {what}")
        if _file_sha256(path) != expected:
            raise CheckpointError(
                f"checkpoint {str(folder)!r}: {rel} does not match its recorded sha256 "
                "(copied from another round or run?)"
            )


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
    found = _pointer(root, run_id)
    if found is None:
        return None
    folder, round_idx, meta_sha = found
    meta = _read_meta(folder, meta_sha)
    if meta.get("run_id") != run_id:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} belongs to run {meta.get('run_id')!r}, not {run_id!r}"
        )
    if meta.get("config_digest") != config_digest:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} was written for another config "
            f"(digest {meta.get('config_digest')}, this run's is {config_digest})"
        )
    if meta.get("round") != round_idx:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} says round {meta.get('round')!r}, its folder another"
        )
    history = meta.get("history")
    if history is not None and len(history) != meta["round"]:
        raise CheckpointError(
            f"checkpoint {str(folder)!r} says round {meta['round']} but holds "
            f"{len(history)} rounds of history"
        )
    _verify_files(folder, meta)
    tensors = _load_tensors(folder / "state.safetensors", folder)
    if "base_file" in meta:
        base = _load_tensors(folder.parent / str(meta["base_file"]), folder)
    else:
        base = {k.removeprefix("base/"): v for k, v in tensors.items() if k.startswith("base/")}
    if "fresh_adapters" in meta:
        fresh = bool(meta["fresh_adapters"])
    else:  # formats 1 and 2: clients downloaded empty LoRA factors after a merge
        fresh = not any(k.startswith("client0/lora/") for k in tensors)
    own = {
        "format",
        "round",
        "run_id",
        "config_digest",
        "n_clients",
        "base_file",
        "fresh_adapters",
        "sha256",
    }
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


def decision_file(after_round: int) -> str:
    """The file name of the rank decision taken after ``after_round`` (0: after the warm-up)."""
    return DECISION_FILE if after_round == 0 else f"rank_decision_round_{after_round:04d}.json"


def decision_file_of(ckpt: Checkpoint) -> str:
    """The decision file a checkpoint's next round trains under, as its meta names it (the first
    decision's before re-ranking existed)."""
    return str(ckpt.meta.get("decision_file", DECISION_FILE))


def save_decision(
    root: Path, run_id: str, decision: Mapping[str, Any], *, after_round: int = 0
) -> str:
    """Write a rank decision beside the run's rounds (not into each round: it changes rarely).

    Returns:
        Its file name (``decision_file(after_round)``), for the checkpoints that train under it.
    """
    run_dir = root / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    name = decision_file(after_round)
    _atomic_write_text(run_dir / name, json.dumps(decision))
    return name


def load_decisions_given(root: Path, ckpt: Checkpoint) -> Mapping[str, Any]:
    """Under ``ranking.difficulty_from: first_participation`` each decision file holds only the
    clients ranked after its round: the decision in force after ``ckpt`` is every file of a
    round up to ``ckpt``'s, their clients together (later files' weights). A file of a round
    after it (written before a crash ended that round) is not read.

    Raises:
        CheckpointError: a file is unreadable.
    """
    folder = root / ckpt.run_id
    rounds = []
    for path in folder.glob("rank_decision*.json"):
        found = _DECISION.fullmatch(path.name)
        if found is None:
            continue
        after = int(found.group(1)[len("_round_") :]) if found.group(1) else 0
        if after <= ckpt.round_idx:
            rounds.append((after, path))
    merged: dict[str, Any] = {"clients": [], "weights": {}}
    for _, path in sorted(rounds):
        try:
            record = dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"rank decision {str(path)!r} is unreadable: {err}") from None
        merged = {**record, "clients": [*merged["clients"], *record["clients"]]}
    merged["clients"].sort(key=lambda row: row["client"])
    merged.setdefault("assigner", "autorank")
    return merged


def load_decision(root: Path, ckpt: Checkpoint) -> Mapping[str, Any]:
    """The rank decision the round after ``ckpt`` trains under: the file its meta names (the
    first decision's before re-ranking existed), or (formats 1-2) the checkpoint's meta.

    Raises:
        CheckpointError: neither holds a readable decision.
    """
    name = decision_file_of(ckpt)
    if not _DECISION.fullmatch(name):
        raise CheckpointError(f"run {ckpt.run_id}: decision_file {name!r} is not a decision file")
    path = root / ckpt.run_id / name
    if path.is_file():
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"rank decision {str(path)!r} is unreadable: {err}") from None
    if "rank_decision" in ckpt.meta:
        return dict(ckpt.meta["rank_decision"])
    raise CheckpointError(f"run {ckpt.run_id} has no rank decision ({str(path)!r} is missing)")


@contextlib.contextmanager
def run_lock(root: Path, run_id: str) -> Iterator[None]:
    """Hold a run's lock while it trains, so that a second process cannot resume it too.

    An advisory ``flock`` on ``<root>/<run_id>/.lock``: the kernel releases it when the holder
    exits, however it ends (a SIGKILL leaves no stale lock).

    Raises:
        CheckpointError: another process holds the run.
    """
    run_dir = root / run_id
    if not run_dir.is_dir():
        raise CheckpointError(f"run {run_id} has no checkpoint folder (expected {run_dir})")
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(_held(run_id, fd)) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def check_unheld(root: Path, run_id: str) -> None:
    """Refuse a run another process holds, leaving its lock file as it is (only read: never
    created, written or taken for longer than the check), so a refused resume changes nothing.

    Raises:
        CheckpointError: another process holds the run.
    """
    try:
        fd = os.open(root / run_id / ".lock", os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return  # never run here
    except OSError as err:
        raise CheckpointError(f"run {run_id}: its lock file is unusable ({err.strerror})") from None
    try:
        try:  # shared: two checks at once do not refuse each other
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(_held(run_id, fd)) from None
    finally:
        os.close(fd)  # releases the shared lock


def _held(run_id: str, fd: int) -> str:
    """The refusal of a run that the process whose pid is in the lock file ``fd`` holds."""
    holder = os.read(fd, 32).decode(errors="replace").strip()
    by = f" (pid {holder})" if holder.isdigit() else ""
    return f"run {run_id} is being run by another process{by}; wait for it to end or stop it"
