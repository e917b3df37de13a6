"""Round checkpoints: round trip, the base written once per content, pruning, refusals."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from autorank.lora.adapters import AdapterState, LoraFactors
from autorank.lora.files import CheckpointError, state_tensors
from autorank.rounds.checkpoint import Checkpoint, base_digest, load_checkpoint, save_checkpoint

RUN = "run0"
DIGEST = "cfg"


def _state(rank: int, fill: float) -> AdapterState:
    lora = {"fc1": LoraFactors(torch.full((rank, 6), fill), torch.full((5, rank), -fill), 2.0)}
    return AdapterState(lora, {"head.weight": torch.full((3, 5), fill)})


def _ckpt(round_idx: int, base: dict[str, torch.Tensor], fresh: bool = False) -> Checkpoint:
    return Checkpoint(
        round_idx=round_idx,
        run_id=RUN,
        config_digest=DIGEST,
        base=base,
        global_state=_state(4, float(round_idx)),
        fresh=fresh,
        meta={"history": [0.1] * round_idx, "metrics": {"global/accuracy": 0.5}},
    )


def _base(value: float) -> dict[str, torch.Tensor]:
    return {"fc1.weight": torch.full((5, 6), value), "fc1.bias": torch.arange(5.0)}


def _bases(root: Path) -> list[str]:
    return sorted(p.name for p in (root / RUN).glob("base-*.safetensors"))


@pytest.mark.parametrize("fresh", [False, True])
def test_round_trip_restores_every_tensor_and_the_meta(tmp_path: Path, fresh: bool) -> None:
    saved = _ckpt(3, _base(0.25), fresh)
    save_checkpoint(tmp_path, saved)

    loaded = load_checkpoint(tmp_path, RUN, config_digest=DIGEST)

    assert loaded is not None and loaded.round_idx == 3 and loaded.fresh is fresh
    assert set(loaded.base) == set(saved.base)
    assert all(torch.equal(loaded.base[k], saved.base[k]) for k in saved.base)
    got_t = state_tensors("x", loaded.global_state)
    want_t = state_tensors("x", saved.global_state)
    assert got_t.keys() == want_t.keys()
    assert all(torch.equal(got_t[k], want_t[k]) for k in want_t)
    assert loaded.meta == {"history": [0.1] * 3, "metrics": {"global/accuracy": 0.5}}


def test_checkpoint_size_does_not_grow_with_clients(tmp_path: Path) -> None:
    saved = _ckpt(1, _base(0.25))
    folder = save_checkpoint(tmp_path, saved)

    names = set(load_file(str(folder / "state.safetensors")))

    assert names == set(state_tensors("global", saved.global_state))


def test_an_unchanged_base_is_written_once_and_a_merged_one_again(tmp_path: Path) -> None:
    frozen = _base(0.25)
    for round_idx in (1, 2, 3):
        save_checkpoint(tmp_path, _ckpt(round_idx, frozen))
    files_when_frozen = _bases(tmp_path)
    state_keys = load_file(str(tmp_path / RUN / "round_0003" / "state.safetensors")).keys()

    save_checkpoint(tmp_path, _ckpt(4, _base(0.75)))  # as after a FLoRA merge

    assert files_when_frozen == [f"base-{base_digest(frozen)}.safetensors"]
    assert state_keys and not [k for k in state_keys if k.startswith("base/")]
    assert _bases(tmp_path) == sorted(
        f"base-{base_digest(b)}.safetensors" for b in (frozen, _base(0.75))
    )
    loaded = load_checkpoint(tmp_path, RUN, config_digest=DIGEST)
    assert loaded is not None and torch.equal(loaded.base["fc1.weight"], _base(0.75)["fc1.weight"])


def test_pruning_keeps_two_rounds_and_only_the_bases_they_name(tmp_path: Path) -> None:
    for round_idx in (1, 2, 3, 4):
        save_checkpoint(tmp_path, _ckpt(round_idx, _base(float(round_idx))))

    rounds = sorted(p.name for p in (tmp_path / RUN).glob("round_*"))

    assert rounds == ["round_0003", "round_0004"]
    assert _bases(tmp_path) == sorted(
        f"base-{base_digest(_base(float(r)))}.safetensors" for r in (3, 4)
    )


def test_digest_tells_dtype_shape_and_names_apart() -> None:
    base = _base(1.0)

    variants = [
        {k: v.double() for k, v in base.items()},
        {"fc1.weight": base["fc1.weight"].reshape(6, 5), "fc1.bias": base["fc1.bias"]},
        {"fc2.weight": base["fc1.weight"], "fc1.bias": base["fc1.bias"]},
    ]

    assert len({base_digest(base), *(base_digest(v) for v in variants)}) == 4
    assert base_digest(base) == base_digest({k: v.clone() for k, v in base.items()})


def test_a_missing_or_corrupt_base_file_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _ckpt(1, _base(0.5)))
    (base_file,) = (tmp_path / RUN).glob("base-*.safetensors")

    base_file.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="does not match its recorded sha256"):
        load_checkpoint(tmp_path, RUN, config_digest=DIGEST)
    base_file.unlink()
    with pytest.raises(CheckpointError, match=r"base-.*is missing"):
        load_checkpoint(tmp_path, RUN, config_digest=DIGEST)


def test_a_format_1_checkpoint_with_the_base_inside_still_loads(tmp_path: Path) -> None:
    folder = tmp_path / RUN / "round_0002"
    folder.mkdir(parents=True)
    ckpt = _ckpt(2, _base(0.5))
    tensors = {f"base/{k}": v for k, v in ckpt.base.items()} | state_tensors(
        "global", ckpt.global_state
    )
    for i in range(2):  # formats 1 and 2 stored each client's download (here: fresh LoRA)
        tensors |= state_tensors(f"client{i}", AdapterState({}, dict(ckpt.global_state.extra)))
    save_file(tensors, str(folder / "state.safetensors"))
    meta = {"format": 1, "round": 2, "run_id": RUN, "config_digest": DIGEST, "n_clients": 2}
    (folder / "meta.json").write_text(json.dumps(meta | dict(ckpt.meta)))
    (tmp_path / RUN / "LATEST").write_text("round_0002")

    loaded = load_checkpoint(tmp_path, RUN, config_digest=DIGEST)

    assert loaded is not None and loaded.round_idx == 2
    assert loaded.fresh  # the clients' stored downloads had no LoRA factors: FLoRA merged
    assert torch.equal(loaded.base["fc1.weight"], ckpt.base["fc1.weight"])


def _forge_meta(folder: Path, changes: dict) -> None:
    """Edit a round's meta and re-bind LATEST to it, as a deliberate forgery would."""
    import hashlib

    meta = json.loads((folder / "meta.json").read_text()) | changes
    text = json.dumps(meta).encode()
    (folder / "meta.json").write_bytes(text)
    sha = hashlib.sha256(text).hexdigest()
    (folder.parent / "LATEST").write_text(f"{folder.name} sha256:{sha}\n")


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"format": 9}, "has format 9, expected one of [1, 2, 3, 4]"),
        ({"run_id": "other"}, "belongs to run 'other'"),
        ({"config_digest": "zzz"}, "written for another config"),
        ({"round": 999}, "says round 999, its folder another"),
        ({"history": [0.5]}, "holds 1 rounds of history"),
        ({"sha256": {}}, "records no file hashes"),
    ],
)
def test_foreign_or_inconsistent_checkpoints_are_refused(
    tmp_path: Path, meta: dict, message: str
) -> None:
    save_checkpoint(tmp_path, _ckpt(1, _base(0.5)))
    folder = save_checkpoint(tmp_path, _ckpt(2, _base(0.5)))
    _forge_meta(folder, meta)

    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_checkpoint(tmp_path, RUN, config_digest=DIGEST)


def test_an_edited_meta_is_refused(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path, _ckpt(2, _base(0.5)))
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(meta | {"round": 999}))

    with pytest.raises(CheckpointError, match="does not match the sha256 in LATEST"):
        load_checkpoint(tmp_path, RUN, config_digest=DIGEST)


def test_a_state_file_from_another_round_or_run_is_refused(tmp_path: Path) -> None:
    old = save_checkpoint(tmp_path, _ckpt(1, _base(0.5)))
    (tmp_path / "elsewhere").mkdir()
    other = save_checkpoint(tmp_path / "elsewhere", _ckpt(2, _base(0.5)))
    folder = save_checkpoint(tmp_path, _ckpt(2, _base(0.5)))
    (folder / "state.safetensors").write_bytes((old / "state.safetensors").read_bytes())

    with pytest.raises(CheckpointError, match=r"state\.safetensors does not match its recorded"):
        load_checkpoint(tmp_path, RUN, config_digest=DIGEST)

    # same content, another run's file: a symlink is refused whatever it points to
    (folder / "state.safetensors").unlink()
    (folder / "state.safetensors").symlink_to(other / "state.safetensors")
    with pytest.raises(CheckpointError, match=r"state\.safetensors is a symbolic link"):
        load_checkpoint(tmp_path, RUN, config_digest=DIGEST)


def test_an_edited_rank_decision_is_refused(tmp_path: Path) -> None:
    from autorank.rounds.checkpoint import save_decision

    save_decision(tmp_path, RUN, {"ranks": [2, 4]})
    save_checkpoint(tmp_path, _ckpt(1, _base(0.5)))
    assert load_checkpoint(tmp_path, RUN, config_digest=DIGEST) is not None
    (tmp_path / RUN / "rank_decision.json").write_text(json.dumps({"ranks": [32, 32]}))

    with pytest.raises(CheckpointError, match=r"rank_decision\.json does not match"):
        load_checkpoint(tmp_path, RUN, config_digest=DIGEST)


def test_a_checkpoint_names_and_binds_the_decision_its_next_round_trains_under(
    tmp_path: Path,
) -> None:
    from dataclasses import replace

    from autorank.rounds.checkpoint import load_decision, save_decision

    # Prepare: the first decision, then one taken again after round 2
    assert save_decision(tmp_path, RUN, {"ranks": [2, 4]}) == "rank_decision.json"
    name = save_decision(tmp_path, RUN, {"ranks": [4, 4]}, after_round=2)
    ckpt = _ckpt(2, _base(0.5))
    ckpt = replace(ckpt, meta={**ckpt.meta, "decision_file": name})

    # Execute
    save_checkpoint(tmp_path, ckpt)
    loaded = load_checkpoint(tmp_path, RUN, config_digest=DIGEST)

    # Verify: the round's decision is the newer one, and an edit of it is refused
    assert name == "rank_decision_round_0002.json"
    assert loaded is not None and load_decision(tmp_path, loaded) == {"ranks": [4, 4]}
    (tmp_path / RUN / name).write_text(json.dumps({"ranks": [32, 32]}))
    with pytest.raises(CheckpointError, match=r"rank_decision_round_0002\.json does not match"):
        load_checkpoint(tmp_path, RUN, config_digest=DIGEST)
    forged = replace(loaded, meta={**loaded.meta, "decision_file": "../../config.json"})
    with pytest.raises(CheckpointError, match="is not a decision file"):
        load_decision(tmp_path, forged)


def test_a_pointer_outside_the_round_folders_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _ckpt(1, _base(0.5)))
    (tmp_path / RUN / "LATEST").write_text("../../etc")

    with pytest.raises(CheckpointError, match="expected a round folder"):
        load_checkpoint(tmp_path, RUN, config_digest=DIGEST)


def test_leftovers_of_interrupted_writes_are_removed(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _ckpt(1, _base(0.5)))
    run_dir = tmp_path / RUN
    (run_dir / ".incomplete-abc").mkdir()
    (run_dir / ".incomplete-abc" / "state.safetensors").write_bytes(b"half")
    (run_dir / ".LATEST.x1y2").write_text("round_0001")
    (run_dir / ".base-1234.safetensors.q").write_bytes(b"half")

    save_checkpoint(tmp_path, _ckpt(2, _base(0.5)))

    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == []
    assert load_checkpoint(tmp_path, RUN, config_digest=DIGEST).round_idx == 2  # type: ignore[union-attr]


def test_a_run_is_held_by_one_process_at_a_time(tmp_path: Path) -> None:
    import subprocess
    import sys
    import textwrap

    from autorank.rounds.checkpoint import run_lock

    (tmp_path / RUN).mkdir()
    holder = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from autorank.rounds.checkpoint import run_lock
        with run_lock(Path({str(tmp_path)!r}), {RUN!r}):
            print("held", flush=True)
            sys.stdin.readline()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with (
            pytest.raises(
                CheckpointError,
                match=rf"run {RUN} is being run by another process \(pid {proc.pid}\)",
            ),
            run_lock(tmp_path, RUN),
        ):
            pass
    finally:
        proc.kill()  # a killed holder leaves no stale lock
        proc.wait()
    with run_lock(tmp_path, RUN):
        pass
    with (
        pytest.raises(CheckpointError, match="has no checkpoint folder"),
        run_lock(tmp_path, "no-such-run"),
    ):
        pass
    assert not (tmp_path / "no-such-run").exists()


def test_no_checkpoint_yet_is_none_and_a_dangling_pointer_an_error(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path, RUN, config_digest=DIGEST) is None

    (tmp_path / RUN).mkdir()
    (tmp_path / RUN / "LATEST").write_text("round_0009")

    with pytest.raises(CheckpointError, match="names a missing folder"):
        load_checkpoint(tmp_path, RUN, config_digest=DIGEST)
