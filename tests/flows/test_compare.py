"""The comparison flow end to end on the digits_small grid, and a resume that re-runs nothing."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from autorank.recipe import rank_table
from autorank.reporting.grid import load_grid
from flows.cli import main
from flows.compare import compare_methods
from tests.flows.conftest import cli_error, refused_in, spawn_cli, store_args, watch_output

ROOT = Path(__file__).resolve().parents[2]
GRID = str(ROOT / "configs/grids/digits_small.yaml")
SCHEDULED = "rbla_tiered1@all_labels+rbla_product"  # double imbalance: tiered, then product
METHODS = ["uniform-rbla", f"uniform-{SCHEDULED}", "autorank-rbla", f"autorank-{SCHEDULED}"]


def _children(client: MlflowClient, parent) -> list:
    experiment = client.get_run(parent).info.experiment_id
    query = f"tags.mlflow.parentRunId = '{parent}'"
    return client.search_runs([experiment], query)


@pytest.fixture(scope="module")
def comparison(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("compare")
    grid = load_grid(
        ROOT / "configs/grids/digits_small.yaml",
        [
            f"base.tracking.uri=sqlite:///{tmp}/mlflow.db",
            f"base.runtime.checkpoint_dir={tmp}/ckpt",
            "base.runtime.device=cpu",
            "reference=uniform-rbla",  # the grid has no uniform at the mean rank: no default
        ],
    )
    parent = compare_methods(grid=grid)
    return grid, parent, MlflowClient(tracking_uri=grid.base.tracking.uri), tmp


def test_four_child_runs_nested_under_the_parent(comparison) -> None:
    _, parent, client, _ = comparison

    children = _children(client, parent)

    assert client.get_run(parent).data.tags["kind"] == "comparison"
    assert client.get_run(parent).info.status == "FINISHED"
    assert sorted(c.info.run_name for c in children) == sorted(f"{m}-s0" for m in METHODS)
    assert all(c.info.status == "FINISHED" for c in children)
    ranks = {c.data.tags["assigner"]: c.data.params["ranking.assigner"] for c in children}
    assert ranks == {"uniform": "uniform", "autorank": "autorank"}


def test_summary_table_and_plots_on_the_parent(comparison) -> None:
    _, parent, client, tmp = comparison

    local = Path(client.download_artifacts(parent, "", str(tmp / "dl")))
    summary = (local / "summary.md").read_text()
    table = json.loads((local / "summary.json").read_text())

    lines = [line for line in summary.splitlines() if line.startswith("| ") and "---" not in line]
    rows, paired = lines[:5], [row.split(" | ") for row in lines[5:]]
    assert len(rows) == 1 + 4 and rows[0].startswith("| assigner |")
    for method in METHODS:
        assigner, aggregator = method.split("-")
        start = f"| {assigner} | {aggregator} |"
        mine = [row.split(" | ") for row in rows if row.startswith(start)]
        assert len(mine) == 1 and mine[0][6] == "1", method  # one seed
    assert len(table["data"]) == 4 and "best_accuracy_mean" in table["columns"]
    for png in ("accuracy_per_round", "rank_per_client"):
        assert (local / "plots" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    assert (local / "grid.yaml").is_file()
    assert table["columns"][:3] == ["assigner", "aggregator", "best_accuracy_mean"]
    assert "Paired against `uniform-rbla` (best accuracy, final accuracy:" in summary
    assert [row[0] for row in paired] == ["| method", *(f"| {m}" for m in METHODS[1:])]
    assert all(row[2] == row[5] == "-" and row[3] in ("0/1", "1/1") for row in paired[1:])
    p_values = table["columns"].index("best_diff_p"), table["columns"].index("final_diff_p")
    assert {row[i] for row in table["data"] for i in p_values} == {None}
    assert [row[-1] for row in table["data"]] == [None, 1, 1, 1]  # paired_seeds


def test_the_parent_shows_its_summary_as_description_and_metrics(comparison) -> None:
    _, parent, client, _ = comparison

    run = client.get_run(parent)
    metrics = run.data.metrics

    note = run.data.tags["mlflow.note.content"]
    assert ["autorank-rbla"] in [line.split()[:1] for line in note.splitlines()]
    assert "```" in note and "summary.md" in note
    keys = [m.replace("+", "_").replace("@", "_") for m in METHODS]  # MLflow keys take neither
    for key in keys:
        assert 0.0 < metrics[f"final_accuracy/{key}"] <= 1.0, key
        assert metrics[f"communicated_mb/{key}"] > 0
    assert {k for k in metrics if "_diff/" in k} == {
        f"{stat}_accuracy_diff/{key}" for stat in ("best", "final") for key in keys[1:]
    }
    statistics = {k for k in metrics if not k.startswith("accuracy_per_round/")}
    assert all(len(client.get_metric_history(parent, k)) == 1 for k in statistics)


def test_the_parent_s_metrics_open_on_each_method_s_mean_accuracy_per_round(comparison) -> None:
    _, parent, client, _ = comparison
    children = _children(client, parent)

    for method in METHODS:
        key = f"accuracy_per_round/{method.replace('+', '_').replace('@', '_')}"
        curve = [(m.step, m.value) for m in client.get_metric_history(parent, key)]
        (child,) = [c for c in children if c.info.run_name == f"{method}-s0"]  # one seed
        runs = client.get_metric_history(child.info.run_id, "global/accuracy")
        assert sorted(curve) == sorted((m.step, m.value) for m in runs), method


def test_the_description_links_to_the_comparison_at_a_glance(comparison) -> None:
    _, parent, client, _ = comparison
    run = client.get_run(parent)
    children = {c.info.run_id for c in _children(client, parent)}
    experiment = run.info.experiment_id

    charts = run.data.tags["mlflow.note.content"].splitlines()[0]
    curves, every = re.findall(r"\]\((#/[^)]+)\)", charts)

    assert charts.startswith("Charts: [each method's accuracy per round, mean ± std over seeds]")
    assert curves == (
        f"#/experiments/{experiment}/runs/{parent}/artifacts/plots/accuracy_per_round.png"
        "?workflowType=machine_learning"
    )
    query = urllib.parse.parse_qs(every.removeprefix("#/metric?"))
    assert set(json.loads(query["runs"][0])) == children and len(children) == 4
    assert json.loads(query["metric"][0]) == "global/accuracy"
    assert json.loads(query["plot_metric_keys"][0]) == ["global/accuracy"]
    assert json.loads(query["experiments"][0]) == [experiment]
    assert query["x_axis"] == ["step"] and query["workflowType"] == ["machine_learning"]


def test_resume_of_a_finished_comparison_reruns_nothing(comparison) -> None:
    grid, parent, client, tmp = comparison
    before = {c.info.run_id: c.info.end_time for c in _children(client, parent)}

    again = compare_methods(grid=grid, resume_parent_run_id=parent)

    after = {c.info.run_id: c.info.end_time for c in _children(client, parent)}
    assert again == parent
    assert after == before
    local = Path(client.download_artifacts(parent, "summary.json", str(tmp / "again")))
    assert len(json.loads(local.read_text())["data"]) == 4  # replaced, not appended
    summary = client.get_run(parent).data.metrics
    statistics = [k for k in summary if not k.startswith("accuracy_per_round/")]
    assert all(len(client.get_metric_history(parent, k)) == 1 for k in statistics)  # not twice
    curve = client.get_metric_history(parent, "accuracy_per_round/autorank-rbla")
    assert sorted(m.step for m in curve) == list(range(1, grid.base.training.rounds + 1))


def test_resume_continues_a_failed_cell_in_its_own_run(comparison) -> None:
    grid, parent, client, _ = comparison
    victim = next(c for c in _children(client, parent) if c.info.run_name == "autorank-rbla-s0")
    client.set_terminated(victim.info.run_id, status="FAILED")

    compare_methods(grid=grid, resume_parent_run_id=parent)

    children = _children(client, parent)
    assert len(children) == 4
    assert client.get_run(victim.info.run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(victim.info.run_id, "global/accuracy")]
    assert sorted(steps) == [1, 2]


def _one_round_grid(tmp_path: Path, *overrides: str) -> Any:
    """The small digits grid for one round, tracked and checkpointed in ``tmp_path``, on CPU."""
    store = [
        "base.training.rounds=1",
        f"base.tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"base.runtime.checkpoint_dir={tmp_path}/ckpt",
        "base.runtime.device=cpu",
    ]
    return load_grid(ROOT / "configs/grids/digits_small.yaml", [*overrides, *store])


def test_mean_autorank_cells_run_after_autorank_two_at_a_time(
    prefect_harness: None, tmp_path: Path
) -> None:
    grid = _one_round_grid(
        tmp_path,
        "assigners=[autorank, {assigner: uniform, uniform_rank: mean_autorank}, "
        "{assigner: uniform, uniform_rank: budget_autorank}]",
        "aggregators=[rbla, fedavg]",
        "max_parallel=2",
    )
    client = MlflowClient(tracking_uri=grid.base.tracking.uri)

    parent = compare_methods(grid=grid)

    children = {c.info.run_name: c for c in _children(client, parent)}
    assert sorted(children) == [
        "autorank-rbla-s0",
        "uniform-budget_autorank-fedavg-s0",
        "uniform-budget_autorank-rbla-s0",
        "uniform-mean_autorank-fedavg-s0",
        "uniform-mean_autorank-rbla-s0",
    ]
    decision = json.loads(
        Path(
            client.download_artifacts(
                children["autorank-rbla-s0"].info.run_id, "rank_decision.json", str(tmp_path)
            )
        ).read_text()
    )
    ranks = [row["rank"] for row in decision["clients"]]
    expected = int(sum(ranks) / len(ranks) + 0.5)
    for name in ("uniform-mean_autorank-fedavg-s0", "uniform-mean_autorank-rbla-s0"):
        assert children[name].data.params["ranking.uniform_rank"] == str(expected)
    for name in ("uniform-budget_autorank-fedavg-s0", "uniform-budget_autorank-rbla-s0"):
        run = children[name].data
        assert run.params["ranking.budget_params"] == str(decision["total_params"])
        ranks = {run.metrics[f"per_client/c{k:02d}/rank"] for k in range(4)}
        assert len(ranks) == 1  # uniform: one rank, the largest that fits AutoRank's budget
    summary = Path(client.download_artifacts(parent, "summary.md", str(tmp_path))).read_text()
    assert "- skipped `autorank-fedavg-s0`: " in summary


def test_autorank_cells_that_differ_in_their_merge_train_one_warm_up(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: count the warm-ups the engines train
    from flows.engines import Engines

    warm_ups: list[str] = []
    train = Engines.train

    def counting(self: Engines, config: Any, *args: Any) -> Any:
        if args[-1] == "warm-up":
            warm_ups.append(str(config.tracking.run_name))
        return train(self, config, *args)

    monkeypatch.setattr(Engines, "train", counting)
    grid = _one_round_grid(tmp_path, "assigners=[autorank]", "aggregators=[rbla, zeropad]")
    client = MlflowClient(tracking_uri=grid.base.tracking.uri)

    # Execute
    parent = compare_methods(grid=grid)

    # Assert: one warm-up, and both cells decided the same ranks from it
    children = {c.info.run_name: c for c in _children(client, parent)}
    assert warm_ups == ["autorank-rbla-s0"]
    decisions = [
        Path(
            client.download_artifacts(children[n].info.run_id, "rank_decision.json", str(d))
        ).read_text()
        for n, d in (("autorank-rbla-s0", tmp_path / "a"), ("autorank-zeropad-s0", tmp_path / "b"))
    ]
    assert decisions[0] == decisions[1]


def test_without_an_autorank_cell_the_budget_comes_from_the_no_training_decision(
    prefect_harness: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: AutoRank is not in the grid, so its ranks are decided without the warm-up
    grid = load_grid(
        ROOT / "configs/grids/digits_small.yaml",
        [
            "assigners=[{assigner: uniform, uniform_rank: budget_autorank}]",
            "aggregators=[rbla]",
            "base.training.rounds=1",
            f"base.tracking.uri=sqlite:///{tmp_path}/mlflow.db",
            f"base.runtime.checkpoint_dir={tmp_path}/ckpt",
            "base.runtime.device=cpu",
        ],
    )
    base = grid.base
    config = base.model_copy(
        update={"ranking": base.ranking.model_copy(update={"assigner": "autorank"})}
    )
    sizes = dict(zip(["fc1", "fc2"], [64 + 200, 200 + 200], strict=True))  # digits: 64-200-200
    want = sum(
        sum(d.layer_ranks[name] * n for name, n in sizes.items())
        for d in rank_table(config).decisions
    )

    # Execute
    with caplog.at_level(logging.INFO):
        parent = compare_methods(grid=grid)

    # Assert
    client = MlflowClient(tracking_uri=base.tracking.uri)
    (child,) = _children(client, parent)
    assert child.data.params["ranking.budget_params"] == str(want)
    lines = [r.getMessage() for r in caplog.records]
    assert "seed 0: no AutoRank cell; its ranks come from the no-training criteria" in lines
    assert f"seed 0: AutoRank's ranks train {want:,} LoRA parameters" in lines


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The CLI sets Prefect's home and log level and the progress handler: undo them after."""
    for key in ("PREFECT_LOGGING_LEVEL", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        monkeypatch.setenv(key, "WARNING" if key.startswith("PREFECT") else "false")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    progress = logging.getLogger("autorank.progress")
    saved = (list(progress.handlers), progress.propagate, progress.level)
    yield
    progress.handlers[:] = saved[0]
    progress.propagate, progress.level = saved[1], saved[2]


BAD = [
    (["compare"], "required: --config"),
    (["compare", "--config", "missing.yaml"], "not found"),
    (["compare", "--config", GRID, "--set", "assigners=[wizard]"], "wizard"),
    (["compare", "--config", GRID, "--set", "aggregators=[rbla, nope]"], "nope"),
    (["compare", "--config", GRID, "--set", "seeds=[0, 0]"], "seeds"),
    (["compare", "--config", GRID, "--set", "base.data.name=nope"], "nope"),
    (["compare", "--config", GRID, "--set", "base.partition.n_clients=5000"], "n_clients"),
    (
        [
            "compare",
            "--config",
            GRID,
            "--set",
            "assigners=[autorank]",
            "--set",
            "aggregators=[fedavg]",
        ],
        "no runnable cell",
    ),
    (["compare", "--config", GRID, "--resume", "nope"], "no tracking store"),
    (
        [
            "compare",
            "--config",
            GRID,
            "--set",
            "aggregators=[fedavg, rbla]",
            "--set",
            "reference=autorank-fedavg",
        ],
        "reference: 'autorank-fedavg' never runs",
    ),
]


@pytest.mark.parametrize(("argv", "expected"), BAD, ids=[e for _, e in BAD])
def test_bad_compare_input_is_one_line_exit_2_nothing_written(
    argv: list[str],
    expected: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    cli_env: None,
) -> None:
    err = cli_error([*argv, *store_args(tmp_path, "base.")], capsys)

    assert expected in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("store", ["missing", "empty"])
def test_a_refused_compare_resume_starts_no_server_and_writes_nothing(
    store: str, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    if store == "empty":  # an MLflow store that does not hold the parent
        MlflowClient(tracking_uri=uri).search_experiments()
    args = ["compare", "--config", GRID, "--set", f"base.tracking.uri={uri}"]
    args += ["--set", f"base.runtime.checkpoint_dir={tmp_path}/ckpt", "--resume", "nope"]

    err = refused_in(tmp_path, args)

    where = "no tracking store at" if store == "missing" else "not found in the tracking store"
    assert err.startswith("autorank: error: run 'nope' not found") and where in err, err


def test_cli_resume_prints_the_table_and_refuses_other_runs(
    comparison, capsys: pytest.CaptureFixture[str], cli_env: None
) -> None:
    grid, parent, client, _ = comparison
    store = ["--set", f"base.tracking.uri={grid.base.tracking.uri}"]
    store += ["--set", f"base.runtime.checkpoint_dir={grid.base.runtime.checkpoint_dir}"]
    child = _children(client, parent)[0].info.run_id

    code = main(["compare", "--config", GRID, *store, "--resume", parent])
    out = capsys.readouterr().out
    bad_id = main(["compare", "--config", GRID, *store, "--resume", "nope"])
    not_comparison = main(["compare", "--config", GRID, *store, "--resume", child])
    other_grid = main(
        ["compare", "--config", GRID, *store, "--set", "seeds=[0, 1]", "--resume", parent]
    )
    err = capsys.readouterr().err

    assert code == 0
    assert out.split()[:3] == ["method", "best", "final"] and f"parent run id: {parent}" in out
    assert max(len(line) for line in out.splitlines()[:6]) <= 100
    experiment_id = client.get_run(parent).info.experiment_id
    assert f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{parent}" in out
    assert (bad_id, not_comparison, other_grid) == (2, 2, 2)
    assert "'nope' not found" in err and "is not a comparison" in err
    assert f"comparison {parent} ran another grid" in err
    assert len(_children(client, parent)) == 4


def test_ctrl_c_stops_the_cells_training_in_parallel_and_marks_them_interrupted(
    tmp_path: Path,
) -> None:
    # Prepare: two cells at a time, far more rounds than the test waits for. Ctrl-C reaches
    # the main thread only; the cells train in others, and once trained on to their last round.
    rounds = 3000
    argv = ["compare", "--config", GRID, *store_args(tmp_path, "base.")]
    argv += ["--set", "max_parallel=2", "--set", f"base.training.rounds={rounds}"]
    proc = spawn_cli(argv, dict(os.environ, PREFECT_HOME=str(tmp_path / "home")))
    # both cells started, and one has trained a few rounds
    lines, both = watch_output(
        proc, lambda said: said.count(": starting\n") == 2 and f"round 5/{rounds}" in said
    )
    try:
        assert both.wait(timeout=240), "".join(lines)[-3000:]

        # Execute
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)  # a bound, not a figure: the cells stop within seconds
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(0.5)  # the reader's last lines
    out = "".join(lines)

    # Assert: each cell stopped mid-run, marked as interrupted, its checkpoints kept
    assert code == 128 + signal.SIGINT, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "autorank: interrupted; completed rounds are checkpointed" in out
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/store/mlflow.db")
    parent = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.kind = 'comparison'"
    )[0]
    children = _children(client, parent.info.run_id)
    assert parent.info.status == "KILLED"
    assert len(children) == 2 and {c.info.status for c in children} == {"KILLED"}, out[-3000:]
    trained = []
    for child in children:
        run_id = child.info.run_id
        steps = [m.step for m in client.get_metric_history(run_id, "global/accuracy")]
        assert len(steps) < rounds
        if steps:
            latest = (tmp_path / "ckpt" / run_id / "LATEST").read_text().split()[0]
            assert latest == f"round_{max(steps):04d}"
        trained.append(len(steps))
        assert re.search(rf"run {run_id} stopped; `\S*autorank resume {run_id}` continues it", out)
    assert max(trained) >= 5


@pytest.mark.slow
def test_killed_comparison_resumes_the_interrupted_cell(tmp_path: Path) -> None:
    argv = ["compare", "--config", GRID, *store_args(tmp_path, "base.")]
    argv += ["--set", "base.training.rounds=6", "--set", "base.training.local_epochs=4"]
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "home"))
    command = [sys.executable, "-m", "flows.cli", *argv]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:  # kill once the second cell has checkpointed a round
        while len(list((tmp_path / "ckpt").glob("*/LATEST"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "never reached cell 2"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/store/mlflow.db")
    parent = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.kind = 'comparison'"
    )[0].info.run_id
    interrupted = {c.info.run_id for c in _children(client, parent) if c.info.status == "RUNNING"}

    resumed = subprocess.run(
        [*command, "--resume", parent], env=env, capture_output=True, timeout=400, check=False
    )

    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    children = _children(client, parent)
    assert len(interrupted) == 1 and interrupted <= {c.info.run_id for c in children}
    assert sorted(c.info.run_name for c in children) == sorted(f"{m}-s0" for m in METHODS)
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "global/accuracy")]
        assert sorted(steps) == [1, 2, 3, 4, 5, 6], child.info.run_name


def _dry_run(tmp_path: Path, *sets: str, grid: str = GRID, estimate: bool = False) -> list[str]:
    """``compare --dry-run`` of ``grid`` with its store under ``tmp_path`` and ``--set``s;
    without the estimate (one cell run for a round or two) unless asked."""
    argv = ["compare", "--config", grid, *store_args(tmp_path, "base."), "--dry-run"]
    argv += [] if estimate else ["--no-estimate"]
    for item in sets:
        argv += ["--set", item]
    return argv


def test_a_grid_beyond_max_cells_is_refused_and_its_dry_run_says_how_large(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _dry_run(tmp_path, f"seeds={list(range(300))}")  # 2 assigners x 2 aggregators x 300

    err = cli_error(argv, capsys)
    code = main([*argv, "--set", "max_cells=1200"])
    lines = capsys.readouterr().out.splitlines()

    assert "max_cells: the grid expands to 1,200 runs (2 assigners x 2 aggregators x 300" in err
    assert "raise it with --set max_cells=1200" in err
    assert code == 0 and lines[-1].startswith("1200 runs")
    assert not list(tmp_path.iterdir())


def test_dry_run_lists_the_runs_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _dry_run(tmp_path, "aggregators=[rbla, fedavg]", "seeds=[0, 1]")

    code = main(argv)
    captured = capsys.readouterr()

    lines = captured.out.splitlines()
    names = [line.split()[0] for line in lines[1:] if line.split()[0].endswith(("-s0", "-s1"))]
    assert code == 0 and captured.err == ""
    assert names == [
        f"{m}-s{s}" for s in (0, 1) for m in ("uniform-rbla", "uniform-fedavg", "autorank-rbla")
    ]
    assert [line for line in lines if line.startswith("skipped ")] == [
        f"skipped autorank-fedavg-s{s}: config: aggregation.method 'fedavg' needs equal ranks: "
        "set ranking.assigner to 'uniform' (got 'autorank')"
        for s in (0, 1)
    ]
    assert lines[-1].startswith("6 runs (0 wait for AutoRank's decision), 2 skipped")
    assert not (tmp_path / "store").exists() and not (tmp_path / "ckpt").exists()
    # Columns line up, however long a method or aggregator name is
    assert lines[0].split() == ["run", "method", "aggregator", "seed", "rounds"]
    starts = {line.index(" rbla" if "rbla" in line else " fedavg") for line in lines[1:7]}
    assert len(starts) == 1


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (
            ["assigners=[autorank]", "aggregators=[fedavg]"],
            "the grid has no runnable cell (every combination was skipped)",
        ),
        (
            ["aggregators=[fedavg, rbla]", "reference=autorank-fedavg"],
            "reference: 'autorank-fedavg' never runs (every cell of it is skipped); "
            "expected one of uniform-fedavg, uniform-rbla, autorank-rbla",
        ),
    ],
    ids=["nothing runs", "reference never runs"],
)
def test_dry_run_of_a_grid_the_run_refuses_lists_it_and_exits_2(
    sets: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _dry_run(tmp_path, *sets)

    code = main(argv)
    captured = capsys.readouterr()

    assert code == 2
    assert captured.err.strip().splitlines() == [f"autorank: error: {expected}"]
    assert any(
        line.startswith("skipped autorank-fedavg-s0: ") for line in captured.out.splitlines()
    )
    assert not (tmp_path / "store").exists() and not (tmp_path / "ckpt").exists()


def test_dry_run_shows_each_method_and_the_paired_reference(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(_dry_run(tmp_path, grid=str(ROOT / "configs/grids/digits_rerank.yaml")))

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[3].split()[:3] == ["autorank-rerank5-rbla-s0", "autorank-rerank5", "rbla"]
    assert "paired against: autorank-rbla" in lines


def test_dry_run_estimates_each_method_from_one_cell_run_in_a_temporary_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = _dry_run(tmp_path, estimate=True)

    code = main(argv)
    captured = capsys.readouterr()

    lines = captured.out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("estimated time, from "))
    assert code == 0, captured.err
    assert "estimating: running autorank-rbla-s0's first rounds" in captured.err
    # The cell that trains a warm-up is the one measured, for the grid's 2 rounds.
    assert lines[at].startswith("estimated time, from autorank-rbla-s0 measured for 2 round(s)")
    methods = [line.split()[0] for line in lines[at + 1 : -1]]
    assert methods == [
        "uniform-rbla",
        "uniform-rbla_tiered1@all_labels+rbla_product",
        "autorank-rbla",
        "autorank-rbla_tiered1@all_labels+rbla_product",
    ]
    assert all(re.search(r"1 run\(s\), ~[\d.]+ s each$", line) for line in lines[at + 1 : -1])
    assert re.fullmatch(
        r"total: ~[\d.]+ s: the start-up once, then one run after another", lines[-1]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, here or in ./


def test_dry_run_of_a_grid_whose_data_is_missing_refuses_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = f"base.data.path={tmp_path}/no-mnist"
    argv = _dry_run(tmp_path, "base.data.name=mnist", missing, estimate=True)

    err = cli_error(argv, capsys)

    assert err.startswith(f"autorank: error: mnist: folder '{tmp_path}/no-mnist'")
    assert not (tmp_path / "store").exists() and not (tmp_path / "ckpt").exists()


def test_dry_run_refuses_what_the_run_s_preflight_refuses_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = cli_error(_dry_run(tmp_path, "base.lora.r_max=100000", estimate=True), capsys)

    assert "r_max" in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "ckpt").exists()


def test_dry_run_whose_measuring_run_fails_says_why_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows import estimate

    def failing(command: list[str], folder: Path) -> subprocess.CompletedProcess[str]:
        assert command[-3:-1] == ["run", "--config"] and folder != Path.cwd()
        return subprocess.CompletedProcess(command, 1, "", "...\nautorank: error: it broke\n")

    monkeypatch.setattr(estimate, "run_child", failing)
    argv = _dry_run(tmp_path, estimate=True)

    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()

    assert code == 1
    assert err[-1] == "autorank: no estimate: measuring autorank-rbla-s0 failed: it broke"
    assert not (tmp_path / "store").exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_a_dry_run_stopped_while_measuring_leaves_nothing_running_or_written(
    signum: int, tmp_path: Path
) -> None:
    import psutil

    proc = spawn_cli(_dry_run(tmp_path, estimate=True), dict(os.environ), cwd=tmp_path)
    lines, measuring = watch_output(proc, lambda out: "estimating: running" in out)
    assert measuring.wait(120), "".join(lines)
    time.sleep(4)  # inside the measuring run: its Prefect server is up or booting
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # Ctrl-C at a terminal reaches the command's group
    else:
        os.kill(proc.pid, signum)  # a scheduler's stop reaches the command only

    code = proc.wait(60)
    time.sleep(0.5)

    assert code == 128 + signum, "".join(lines)
    assert lines[-1] == "autorank: estimate stopped\n" and "Traceback" not in "".join(lines)
    left = []
    for p in psutil.process_iter(["cwd"]):
        if "autorank-estimate-" in (p.info["cwd"] or ""):
            left.append(p.pid)
    assert left == []  # the measuring run and its Prefect server stopped with the command
    assert sorted(p.name for p in tmp_path.iterdir()) == []
