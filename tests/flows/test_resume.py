"""A run killed with SIGKILL mid-round and resumed ends exactly like an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from autorank.checkpoint import CheckpointError, load_checkpoint
from autorank.config import ExperimentConfig, config_digest, to_yaml
from flows.experiment import federated_training
from tests.flows.conftest import storage_files, tiny_config

ROUNDS = 5
KEYS = ("global/accuracy", "global/loss", "per_client/accuracy_mean", "per_client/accuracy_p10")
SAMPLED = "per_client/c02/accuracy"  # client 2 is not sampled every round


def _cli(*args: str, home: Path, own_server: bool = False) -> subprocess.Popen[bytes]:
    from prefect.settings import get_current_settings

    env = dict(os.environ, PREFECT_HOME=str(home))
    if not own_server:  # the test harness's API server, instead of booting one (seconds)
        env["PREFECT_API_URL"] = get_current_settings().api.url or ""
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill takes its API server along
    )


def _wait_for_round(ckpt_dir: Path, round_idx: int, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        for pointer in ckpt_dir.glob("*/LATEST"):
            if pointer.read_text().split()[0] == f"round_{round_idx:04d}":
                return pointer.parent.name
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"run ended before round {round_idx}:\n{out[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"round {round_idx} never checkpointed")


def _written_config(tmp_path: Path) -> tuple[ExperimentConfig, Path]:
    """A run long enough to stop mid-way, and its YAML file for the CLI."""
    # 3 of the 4 clients train each round: resume must sample the same cohorts again.
    config = tiny_config(
        tmp_path, training={"rounds": ROUNDS, "local_epochs": 12, "clients_per_round": 3}
    )
    config_file = tmp_path / "config.yaml"
    config_file.write_text(to_yaml(config))
    return config, config_file


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_sigkill_mid_round_then_resume_matches_uninterrupted(
    prefect_harness: None, tmp_path: Path
) -> None:
    config, config_file = _written_config(tmp_path)
    ckpt_dir = config.runtime.checkpoint_dir
    reference = federated_training(config=config)

    proc = _cli("run", "--config", str(config_file), home=tmp_path / "home")
    victim = None
    try:
        while victim is None or victim == reference:
            victim = _wait_for_round(ckpt_dir, 2, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    client = MlflowClient(tracking_uri=config.tracking.uri)
    logged = _history(client, victim, "global/accuracy")
    assert len(logged) < ROUNDS  # really interrupted

    resumed = _cli("resume", victim, "--checkpoint-dir", str(ckpt_dir), home=tmp_path / "home")
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out.decode()[-3000:]

    assert client.get_run(victim).info.status == "FINISHED"
    for key in KEYS:
        got, want = _history(client, victim, key), _history(client, reference, key)
        assert [s for s, _ in got] == list(range(1, ROUNDS + 1)), key
        assert got == want, key
    sampled = _history(client, victim, SAMPLED)
    assert 0 < len(sampled) < ROUNDS  # the check below sees sampling, not full rounds
    assert sampled == _history(client, reference, SAMPLED)


def test_checkpoint_of_another_config_or_corrupt_is_refused(
    prefect_harness: None, tmp_path: Path
) -> None:
    config = tiny_config(tmp_path, training={"rounds": 1, "local_epochs": 1})
    run_id = federated_training(config=config)
    root = config.runtime.checkpoint_dir
    other = tiny_config(tmp_path, training={"rounds": 1, "local_epochs": 2})

    with pytest.raises(CheckpointError, match="another config"):
        load_checkpoint(root, run_id, config_digest=config_digest(other))
    state = next(root.glob(f"{run_id}/round_*/state.safetensors"))
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"state\.safetensors does not match its recorded"):
        load_checkpoint(root, run_id, config_digest=config_digest(config))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_stops_cleanly_marks_killed_and_resumes(
    prefect_harness: None, tmp_path: Path
) -> None:
    config, config_file = _written_config(tmp_path)
    ckpt_dir = config.runtime.checkpoint_dir

    proc = _cli("run", "--config", str(config_file), home=tmp_path / "home", own_server=True)
    try:
        victim = _wait_for_round(ckpt_dir, 2, proc)
        proc.send_signal(signal.SIGTERM)  # the CLI process only, as a scheduler would
        out, _ = proc.communicate(timeout=60)
        deadline = time.monotonic() + 15
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        orphaned = _group_alive(proc.pid)
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    client = MlflowClient(tracking_uri=config.tracking.uri)

    assert proc.returncode == 128 + signal.SIGTERM, out.decode()[-3000:]
    assert "autorank: terminated; completed rounds are checkpointed" in out.decode()
    assert f"run {victim} stopped; `autorank resume {victim}` continues it" in out.decode()
    assert not orphaned  # its Prefect API server went with it
    assert client.get_run(victim).info.status == "KILLED"
    assert len(_history(client, victim, "global/accuracy")) < ROUNDS

    resumed = _cli("resume", victim, "--checkpoint-dir", str(ckpt_dir), home=tmp_path / "home")
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out.decode()[-3000:]
    assert client.get_run(victim).info.status == "FINISHED"
    steps = [s for s, _ in _history(client, victim, "global/accuracy")]
    assert steps == list(range(1, ROUNDS + 1))


def test_a_tampered_checkpoint_is_refused_in_one_line_and_nothing_changes(
    prefect_harness: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from autorank.checkpoint import latest_round_dir
    from tests.flows.conftest import cli_error

    config = tiny_config(tmp_path, training={"rounds": 2, "local_epochs": 1})
    run_id = federated_training(config=config)
    client = MlflowClient(tracking_uri=config.tracking.uri)
    client.set_terminated(run_id, "KILLED")  # as if it had been stopped
    root = config.runtime.checkpoint_dir
    folder = latest_round_dir(root, run_id)
    assert folder is not None
    meta = folder / "meta.json"
    meta.write_text(meta.read_text().replace('"round": 2', '"round": 999'))
    before = storage_files()
    logged = _history(client, run_id, "global/accuracy")
    capsys.readouterr()  # the run's own progress lines

    err = cli_error(["resume", run_id, "--checkpoint-dir", str(root)], capsys)

    assert "meta.json does not match the sha256 in LATEST" in err
    assert client.get_run(run_id).info.status == "KILLED"
    assert _history(client, run_id, "global/accuracy") == logged
    assert storage_files() == before  # no pickled exception left by Prefect


def test_resuming_a_finished_run_says_so_and_changes_nothing(
    prefect_harness: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main

    config = tiny_config(tmp_path, training={"rounds": 2, "local_epochs": 1})
    run_id = federated_training(config=config)
    client = MlflowClient(tracking_uri=config.tracking.uri)
    before = client.get_run(run_id)
    keys = sorted(before.data.metrics)
    histories = {k: _history(client, run_id, k) for k in keys}

    code = main(["resume", run_id, "--checkpoint-dir", str(config.runtime.checkpoint_dir)])

    assert code == 0
    assert f"run {run_id} already finished; nothing to resume" in capsys.readouterr().err
    after = client.get_run(run_id)
    assert (after.info.status, after.info.end_time) == ("FINISHED", before.info.end_time)
    assert {k: _history(client, run_id, k) for k in keys} == histories
    assert all(len(h) == 1 for k, h in histories.items() if k.startswith("summary/"))


def test_a_crash_before_the_first_checkpoint_logs_the_rank_decision_once(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.experiment

    config = tiny_config(tmp_path, training={"rounds": 1, "local_epochs": 1})
    client = MlflowClient(tracking_uri=config.tracking.uri)

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the machine went away")

    with monkeypatch.context() as patched:  # after the rank decision, before round 1's record
        patched.setattr(flows.experiment, "_run_round", crash)
        with pytest.raises(RuntimeError, match="went away"):
            federated_training(config=config)
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.status == "FAILED"

    federated_training(config=config, resume_run_id=run.info.run_id)

    for key in ("ranks/mean", "per_client/c00/rank", "per_client/c03/rank"):
        assert _history(client, run.info.run_id, key) == [(0, run.data.metrics[key])], key
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
