"""A run killed with SIGKILL mid-round and resumed ends exactly like an uninterrupted run; one
stopped by SIGTERM (its process, or its process group in the warm-up) ends 143, KILLED, and
resumes."""

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from autorank.config import ExperimentConfig, config_digest, to_yaml
from autorank.lora.files import CheckpointError
from autorank.rounds.checkpoint import load_checkpoint
from flows.cli import main
from flows.experiment import federated_training
from flows.run_records import CONFIG_FILE
from tests.flows.conftest import spawn_cli, storage_files, tiny_config, watch_output

ROUNDS = 4
KEYS = ("global/accuracy", "global/loss", "per_client/accuracy_mean", "per_client/accuracy_p10")
SAMPLED = "per_client/c02/accuracy"  # client 2 is not sampled every round (not in round 4)


def _cli(*args: str, home: Path, own_server: bool = False) -> subprocess.Popen[bytes]:
    from prefect.settings import get_current_settings

    env = dict(os.environ, PREFECT_HOME=str(home))
    if not own_server:  # the test harness's API server, instead of booting one (seconds)
        env["PREFECT_API_URL"] = get_current_settings().api.url or ""
    return spawn_cli(list(args), env)


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


def _killed_after_round(round_idx: int, config_file: Path, ckpt_dir: Path, tmp_path: Path) -> str:
    """``autorank run`` of ``config_file`` in a process of its own, SIGKILLed once it has
    checkpointed ``round_idx``; the run it started."""
    proc = _cli("run", "--config", str(config_file), home=tmp_path / "home")
    try:
        victim = _wait_for_round(ckpt_dir, round_idx, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return victim


def _written_config(tmp_path: Path, **sections: Any) -> tuple[ExperimentConfig, Path]:
    """A run long enough to stop mid-way, and its YAML file for the CLI."""
    # 3 of the 4 clients train each round: resume must sample the same cohorts again.
    training = {"rounds": ROUNDS, "local_epochs": 12, "clients_per_round": 3}
    config = tiny_config(tmp_path, **({"training": training} | sections))
    config_file = tmp_path / "config.yaml"
    config_file.write_text(to_yaml(config))
    return config, config_file


def _resume(run_id: str, ckpt_dir: Path) -> None:
    """``autorank resume`` in this process, on the test harness's API server: what a resume
    does, without a second start-up of torch, Prefect and MLflow (seconds)."""
    assert main(["resume", run_id, "--checkpoint-dir", str(ckpt_dir)]) == 0


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_sigkill_mid_round_then_resume_matches_uninterrupted(
    prefect_harness: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The resumed rounds cross an early merge's end: round 3 merges with rbla_tiered, round 4
    # with rbla_product, as in the uninterrupted run. The early merge waits for the labels,
    # which every rank tier holds under the double imbalance: the resume decides it again.
    early = {
        "method": "rbla_product",
        "early_method": "rbla_tiered",
        "early_rounds": 3,
        "early_when": "all_labels",
    }
    config, config_file = _written_config(tmp_path, aggregation=early)
    ckpt_dir = config.runtime.checkpoint_dir
    reference = federated_training(config=config)

    victim = _killed_after_round(2, config_file, ckpt_dir, tmp_path)  # not the reference
    client = MlflowClient(tracking_uri=config.tracking.uri)
    logged = _history(client, victim, "global/accuracy")
    assert len(logged) < ROUNDS  # really interrupted

    capsys.readouterr()
    _resume(victim, ckpt_dir)
    said = capsys.readouterr()
    printed = (said.out + said.err).splitlines()
    resumed = [ln for ln in printed if "resuming run" in ln]

    assert client.get_run(victim).info.status == "FINISHED"
    applied = "rbla_tiered in rounds 1-3: every rank tier's clients hold every label"
    # A resume inside the early rounds says the plan again (the same one), as round 1 did
    after = int(resumed[0].split()[-1])
    plans = [ln for ln in printed if "early merge " in ln]
    assert plans == ([f"[autorank] early merge {applied}"] if after < 3 else []), (after, plans)
    assert client.get_run(reference).data.tags["early_merge"] == applied  # client 3 in each
    assert client.get_run(victim).data.tags["early_merge"] == applied
    for key in KEYS:
        got, want = _history(client, victim, key), _history(client, reference, key)
        assert [s for s, _ in got] == list(range(1, ROUNDS + 1)), key
        assert got == want, key
    sampled = _history(client, victim, SAMPLED)
    assert 0 < len(sampled) < ROUNDS  # the check below sees sampling, not full rounds
    assert sampled == _history(client, reference, SAMPLED)


def test_first_participation_on_a_generated_population_resumes_bit_identical(
    prefect_harness: None, tmp_path: Path
) -> None:
    # Prepare: 60 generated clients, 6 a round, each ranked after its first round
    config, config_file = _written_config(
        tmp_path,
        data={"name": "synthetic"},
        partition={"n_clients": 60},
        training={"rounds": ROUNDS, "local_epochs": 12, "clients_per_round": 6},
        ranking={"difficulty_from": "first_participation"},
    )
    ckpt_dir = config.runtime.checkpoint_dir
    reference = federated_training(config=config)

    # Execute: SIGKILL after round 2, then resume
    victim = _killed_after_round(2, config_file, ckpt_dir, tmp_path)
    client = MlflowClient(tracking_uri=config.tracking.uri)
    assert len(_history(client, victim, "global/accuracy")) < ROUNDS  # really interrupted
    _resume(victim, ckpt_dir)

    # Assert: the same figures and the same ranks, given to the same clients in the same rounds
    for key in (*KEYS, "ranks/mean"):
        got, want = _history(client, victim, key), _history(client, reference, key)
        assert got == want and len(want) >= 1, key
    files = [sorted((ckpt_dir / run).glob("rank_decision*.json")) for run in (victim, reference)]
    assert [f.name for f in files[0]] == [f.name for f in files[1]]
    ranked = [yaml.safe_load(f[-1].read_text())["clients"] for f in files]
    assert ranked[0] == ranked[1]
    assert 6 <= len(ranked[0]) < 60  # only the clients that trained, each ranked once
    from flows.run_records import read_decision

    final = read_decision(config.tracking.uri, victim)
    everyone = sorted(
        row["client"] for f in files[0] for row in yaml.safe_load(f.read_text())["clients"]
    )
    assert [row["client"] for row in final["clients"]] == everyone == sorted(set(everyone))


FINISHED = {"rounds": 2, "local_epochs": 1}


@pytest.fixture(scope="module")
def finished_run(
    prefect_harness: None, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    """One finished run (its folder: store, artifacts, checkpoints) for the tests below."""
    folder = tmp_path_factory.mktemp("finished")
    return folder, federated_training(config=tiny_config(folder, training=FINISHED))


def _copy_of(finished_run: tuple[Path, str], tmp_path: Path) -> tuple[ExperimentConfig, str]:
    """The finished run, copied into ``tmp_path`` for a test that changes it: its store and
    checkpoints, and the config that ``autorank resume`` reads from them, at the new place."""
    folder, run_id = finished_run
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    config = tiny_config(tmp_path, training=FINISHED)
    (config.runtime.checkpoint_dir / run_id / CONFIG_FILE).write_text(to_yaml(config))
    return config, run_id


def test_checkpoint_of_another_config_or_corrupt_is_refused(
    finished_run: tuple[Path, str], tmp_path: Path
) -> None:
    config, run_id = _copy_of(finished_run, tmp_path)
    root = config.runtime.checkpoint_dir
    other = tiny_config(tmp_path, training=FINISHED | {"local_epochs": 2})

    with pytest.raises(CheckpointError, match="another config"):
        load_checkpoint(root, run_id, config_digest=config_digest(other))
    state = max(root.glob(f"{run_id}/round_*/state.safetensors"))  # the newest round's
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"state\.safetensors does not match its recorded"):
        load_checkpoint(root, run_id, config_digest=config_digest(config))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started: a CLI command's own Prefect API server."""
    listed = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True)
    return [int(p) for p in listed.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _left_behind(pgid: int, pids: list[int], wait_s: float = 15) -> list[int]:
    """What still runs ``wait_s`` seconds on: the process group ``pgid`` (as ``[pgid]``) or
    any of ``pids`` (a server runs in a session of its own); each is then killed."""
    deadline = time.monotonic() + wait_s
    while (_group_alive(pgid) or any(map(_alive, pids))) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pgid] * _group_alive(pgid) + [p for p in pids if _alive(p)]
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    return left


def test_a_group_sigterm_mid_round_stops_cleanly_marks_killed_and_resumes(
    prefect_harness: None, tmp_path: Path
) -> None:
    config, config_file = _written_config(tmp_path)
    ckpt_dir = config.runtime.checkpoint_dir

    proc = _cli("run", "--config", str(config_file), home=tmp_path / "home", own_server=True)
    server: list[int] = []
    try:
        victim = _wait_for_round(ckpt_dir, 2, proc)
        server = _children(proc.pid)
        os.killpg(proc.pid, signal.SIGTERM)  # the process group, as a scheduler may send it
        out, _ = proc.communicate(timeout=60)
    finally:
        left = _left_behind(proc.pid, server)
    client = MlflowClient(tracking_uri=config.tracking.uri)

    assert proc.returncode == 128 + signal.SIGTERM, out.decode()[-3000:]
    assert "autorank: terminated; completed rounds are checkpointed" in out.decode()
    said = rf"run {victim} stopped; `\S*autorank resume {victim}` continues it"
    assert re.search(said, out.decode())
    assert server and not left  # its Prefect API server went with it
    assert client.get_run(victim).info.status == "KILLED"
    assert len(_history(client, victim, "global/accuracy")) < ROUNDS

    _resume(victim, ckpt_dir)
    assert client.get_run(victim).info.status == "FINISHED"
    steps = [s for s, _ in _history(client, victim, "global/accuracy")]
    assert steps == list(range(1, ROUNDS + 1))


def test_ctrl_c_in_the_warm_up_ends_130_and_marks_the_run_killed(
    prefect_harness: None, tmp_path: Path
) -> None:
    # Ctrl-C: SIGINT to the whole process group (the command's API server runs in a session of
    # its own, so it does not get it and is stopped by the command). A warm-up far longer than
    # the signal takes to arrive (80 epochs, seconds, once ended before it on a loaded machine),
    # cut short by it; no checkpoint exists yet. (A resume from before the first checkpoint:
    # test_a_crash_before_the_first_checkpoint_logs_the_rank_decision_once.)
    config, config_file = _written_config(
        tmp_path, model={"init": "random"}, training={"rounds": 1, "warmup_epochs": 5000}
    )
    proc = _cli("run", "--config", str(config_file), home=tmp_path / "home", own_server=True)
    lines, warming = watch_output(proc, lambda said: "warm-up: " in said)
    server: list[int] = []
    try:
        assert warming.wait(timeout=240), "".join(lines)[-3000:]
        server = _children(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=30)  # a generous bound: it stops within seconds
    finally:
        left = _left_behind(proc.pid, server)
    out = "".join(lines)

    assert code == 128 + signal.SIGINT, out[-3000:]
    assert "warm-up done" not in out, out[-3000:]  # stopped in the warm-up
    assert "autorank: interrupted; completed rounds are checkpointed" in out
    assert "Traceback" not in out, out[-3000:]
    assert server and not left
    stopped = re.search(r"run (\w+) stopped; `\S*autorank resume \1` continues it", out)
    assert stopped is not None, out[-3000:]
    client = MlflowClient(tracking_uri=config.tracking.uri)
    assert client.get_run(stopped[1]).info.status == "KILLED"


def test_ctrl_c_while_a_cohort_thread_starts_leaves_no_cohort_running(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: Ctrl-C inside a cohort's submission, in the one wait where it once left a cohort
    # training that nothing waited for: ThreadPoolExecutor starts a worker thread (waiting until
    # it runs), then records it. The cohort ran on through the interpreter's exit, after
    # Prefect's event worker had stopped, and printed a traceback.
    from concurrent.futures import thread as pool_threads

    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.engines import Engines

    config, _ = _written_config(
        tmp_path, model={"init": "random"}, training={"rounds": 1, "warmup_epochs": 5000}
    )
    workers: list[threading.Thread] = []
    submitting = threading.Event()
    start, submit, stop = threading.Thread.start, ThreadPoolTaskRunner.submit, Engines.stop

    def start_then_ctrl_c(thread: threading.Thread) -> None:
        start(thread)
        if submitting.is_set() and getattr(thread, "_target", None) is pool_threads._worker:
            workers.append(thread)
            signal.raise_signal(signal.SIGINT)  # the handler raises at the next bytecode

    def submit_marked(runner: Any, *args: Any, **kwargs: Any) -> Any:
        submitting.set()
        try:
            return submit(runner, *args, **kwargs)
        finally:
            submitting.clear()

    tracked: list[int] = []

    def stop_counted(engines: Engines, wait_s: float = 60) -> None:
        tracked.append(len(engines.in_flight))
        stop(engines, wait_s)

    monkeypatch.setattr(threading.Thread, "start", start_then_ctrl_c)
    monkeypatch.setattr(ThreadPoolTaskRunner, "submit", submit_marked)
    monkeypatch.setattr(Engines, "stop", stop_counted)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    # Execute
    try:
        with pytest.raises(KeyboardInterrupt):
            federated_training(config=config)
    finally:
        signal.signal(signal.SIGINT, previous)

    # Assert: the interrupt landed after the cohort was in flight, which the run then waited for
    assert len(workers) == 1
    assert tracked == [1]
    assert not workers[0].is_alive()


def test_a_tampered_checkpoint_is_refused_in_one_line_and_nothing_changes(
    finished_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from autorank.rounds.checkpoint import latest_round_dir
    from tests.flows.conftest import cli_error

    config, run_id = _copy_of(finished_run, tmp_path)
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
    finished_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, run_id = _copy_of(finished_run, tmp_path)
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


def _tamper(root: Path, run_id: str) -> None:
    from autorank.rounds.checkpoint import latest_round_dir

    meta = (latest_round_dir(root, run_id) or root) / "meta.json"
    meta.write_text(meta.read_text().replace('"round": 2', '"round": 999'))


def _move_store(root: Path, run_id: str) -> None:
    saved = root / run_id / CONFIG_FILE
    uri = yaml.safe_load(saved.read_text())["tracking"]["uri"]
    saved.write_text(saved.read_text().replace(uri, f"{uri.removesuffix('.db')}-elsewhere.db"))


def _delete_store(root: Path, run_id: str) -> None:
    (root.parent / "mlflow.db").unlink()


SPOILED = [
    (_tamper, "meta.json does not match the sha256 in LATEST"),
    (_move_store, "not found: no tracking store at sqlite:///"),
    (_delete_store, "not found: no tracking store at sqlite:///"),
]


@pytest.mark.parametrize(("spoil", "expected"), SPOILED, ids=[f.__name__ for f, _ in SPOILED])
def test_a_refused_resume_starts_no_server_and_writes_nothing(
    spoil: Any, expected: str, finished_run: tuple[Path, str], tmp_path: Path
) -> None:
    from tests.flows.conftest import refused_in

    config, run_id = _copy_of(finished_run, tmp_path)
    MlflowClient(tracking_uri=config.tracking.uri).set_terminated(run_id, "KILLED")
    root = config.runtime.checkpoint_dir
    spoil(root, run_id)

    err = refused_in(tmp_path, ["resume", run_id, "--checkpoint-dir", str(root)])

    assert err.startswith("autorank: error: ") and expected in err, err
    assert not (tmp_path / ".prefect").exists()


def test_resuming_a_run_another_process_holds_is_refused_before_anything(
    finished_run: tuple[Path, str], tmp_path: Path
) -> None:
    from autorank.rounds.checkpoint import run_lock
    from tests.flows.conftest import refused_in

    config, run_id = _copy_of(finished_run, tmp_path)
    MlflowClient(tracking_uri=config.tracking.uri).set_terminated(run_id, "KILLED")
    root = config.runtime.checkpoint_dir

    with run_lock(root, run_id):
        err = refused_in(tmp_path, ["resume", run_id, "--checkpoint-dir", str(root)])

    assert f"run {run_id} is being run by another process (pid {os.getpid()})" in err


def test_resuming_a_finished_run_writes_nothing(
    finished_run: tuple[Path, str], tmp_path: Path
) -> None:
    from tests.flows.conftest import refused_in

    config, run_id = _copy_of(finished_run, tmp_path)
    root = config.runtime.checkpoint_dir

    said = refused_in(tmp_path, ["resume", run_id, "--checkpoint-dir", str(root)], code=0)

    assert said == f"autorank: run {run_id} already finished; nothing to resume\n"
