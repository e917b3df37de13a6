"""The CLI: the rank table, and bad input as one line, exit code 2, nothing written."""

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from autorank.config import LoraConfig, load_config, parse_config
from flows.cli import COMMANDS, Terminated, main
from flows.invocation import command as autorank_command
from tests.flows.conftest import cli_error, refused_in, storage_files, store_args, tiny_config

ROOT = Path(__file__).resolve().parents[2]


def test_ranks_prints_the_default_table(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["ranks"])

    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == "assigner: autorank"
    assert len(out) == 2 + 10 + 1  # header lines, 10 clients, weights
    assert out[-1].startswith("CRITIC weights: entropy=")
    ranks = [int(line.split()[6]) for line in out[2:12]]
    assert ranks == sorted(ranks) and ranks[0] == 2 and ranks[-1] == 32


def test_ranks_json_matches_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["ranks", "--set", "partition.n_clients=5"])
    table = capsys.readouterr().out.splitlines()
    main(["ranks", "--set", "partition.n_clients=5", "--json"])
    record = json.loads(capsys.readouterr().out)

    assert [row["rank"] for row in record["clients"]] == [
        int(line.split()[6]) for line in table[2:7]
    ]
    assert abs(sum(record["weights"].values()) - 1.0) < 1e-9
    assert "early_merge" not in record  # the default merges no early rounds


def test_ranks_shows_caps_and_the_budget(capsys: pytest.CaptureFixture[str]) -> None:
    settings = ["partition.n_clients=5", "ranking.budget_params=20000", "ranking.rank_caps={4: 4}"]
    argv = [arg for s in settings for arg in ("--set", s)]

    main(["ranks", *argv])
    table = capsys.readouterr().out.splitlines()
    main(["ranks", *argv, "--json"])
    record = json.loads(capsys.readouterr().out)

    assert table[6].endswith("fc1=4 fc2=4  (cap 4)")
    assert table[-1].startswith("budget: 20,000 LoRA parameters over all clients, ")
    assert record["total_params"] <= record["budget_params"] == 20000
    # The mlp's rank-r adapters train r (64 + 200) + r (200 + 200) parameters.
    ranks = [row["layer_ranks"] for row in record["clients"]]
    assert record["total_params"] == sum(r["fc1"] * 264 + r["fc2"] * 400 for r in ranks)


@pytest.mark.parametrize(
    ("partition", "verdict", "tier"),
    [
        # the top tier: client 9 alone (rank 32), which holds all ten labels
        ([], "rbla_tiered in rounds 1-5: every rank tier's clients hold every label", (32, 1, 10)),
        (
            ["partition.scheme=dirichlet", "partition.alpha=0.1"],
            "skipped, rbla_product merges from round 1: the 3 client(s) of fc1 rank >= 24 hold 9 "
            "of the federation's 10 labels",
            (24, 3, None),
        ),
    ],
    ids=["double_imbalance", "dirichlet"],
)
def test_ranks_says_whether_an_early_merge_waiting_for_the_labels_would_run(
    capsys: pytest.CaptureFixture[str],
    partition: list[str],
    verdict: str,
    tier: tuple[int, int, int | None],
) -> None:
    # Prepare: the early merge of the README's heterogeneous-rank settings
    settings = [
        *partition,
        "aggregation.method=rbla_product",
        "aggregation.early_method=rbla_tiered",
        "aggregation.early_rounds=5",
        "aggregation.early_when=all_labels",
    ]

    # Execute
    main(["ranks", *(arg for s in settings for arg in ("--set", s))])
    out = capsys.readouterr().out.splitlines()
    main(["ranks", *(arg for s in settings for arg in ("--set", s)), "--json"])
    record = json.loads(capsys.readouterr().out)

    # Assert: the verdict, and the tier it speaks of as the table's rows show it
    assert out[-1] == f"early merge with these ranks (a run decides from its own): {verdict}"
    assert record["early_merge"] == verdict
    rows = [line.split() for line in out[2:12]]
    rank, clients, labels = tier
    members = [row for row in rows if int(row[6]) >= rank]
    assert len(members) == clients
    if labels is not None:
        assert [int(row[2]) for row in members] == [labels]


def test_ranks_plans_the_early_merge_round_by_round_with_partial_participation(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare: 3 of the 10 clients a round; under the double imbalance only client 9, the top
    # rank, holds all ten labels, so a round's tiers hold them all exactly when it trains
    from autorank.rounds.cohorts import sample_clients

    settings = [
        "training.clients_per_round=3",
        "aggregation.method=rbla_product",
        "aggregation.early_method=rbla_tiered",
        "aggregation.early_rounds=5",
        "aggregation.early_when=all_labels",
    ]
    ran = [r for r in range(1, 6) if 9 in sample_clients(10, 3, seed=0, round_idx=r)]
    skipped = [r for r in range(1, 6) if r not in ran]
    assert ran and skipped  # the seed gives both kinds of round

    # Execute
    main(["ranks", *(arg for s in settings for arg in ("--set", s))])
    out = capsys.readouterr().out.splitlines()

    # Assert
    plan = out[-1].removeprefix("early merge with these ranks (a run decides from its own): ")
    assert plan.startswith(
        f"rbla_tiered in round(s) {', '.join(map(str, ran))} of 1-5, rbla_product in the "
        f"others, where a rank tier lacks labels (round {skipped[0]}: the "
    )
    assert plan.endswith(" of the federation's 10 labels)")


BAD = [
    (["run", "--config", "missing.yaml"], "not found"),
    (["run", "--set", "partition.n_clients=0"], "partition.n_clients"),
    (["run", "--set", "data.name=nope"], "nope"),
    (["run", "--set", "data.name=fashion_mnist", "--set", "data.path=/no/such/dir"], "/no/such"),
    (["run", "--set", "partition.n_clients=5000"], "n_clients"),
    (["run", "--set", "lora.target_modules=[nope]"], "nope"),
    (
        ["run", "--set", "model.init=safetensors", "--set", "model.weights_path=/no/w.safetensors"],
        "/no/w.safetensors",
    ),
    (
        [
            "run",
            "--set",
            "partition.scheme=dirichlet",
            "--set",
            "partition.alpha=0.001",
            "--set",
            "partition.min_size=100",
        ],
        "alpha",
    ),
    (["run", "--set", "ranking.assigner=wizard"], "ranking.assigner"),
    (["run", "--set", "tracking.experiment="], "tracking.experiment"),
    (["run", "--set", "training.batch_size=-1"], "training.batch_size"),
    (["run", "--set", "lora.layer_ranges={fc1: {r_min: 9, r_max: 3}}"], "must not exceed"),
    (["run", "--set", "lora.r_max=1000000"], "exceeds layer"),
    (["run", "--set", "lora.layer_ranges={fc9: {r_min: 2, r_max: 4}}"], "['fc9']"),
    (["run", "--set", "runtime.threads_per_client=100000"], "runtime.threads_per_client"),
    (["run", "--set", "training.local_epochs=1000000000"], "training.local_epochs"),
    (["run", "--set", "training.rounds=10000000"], "training.rounds"),
    (["ui", "--port", "0"], "expected a port number 1-65535"),
    (["ui", "--port", "http"], "expected a port number 1-65535"),
    (["run", "--set", "seed=-1"], "seed"),
    (["run", "--set", "training.lr=0"], "training.lr"),
    (["run", "--set", "training.momentum=1.5"], "training.momentum"),
    (["run", "--set", "training.optimizer=rmsprop"], "training.optimizer"),
    (["run", "--set", "training.clients_per_round=0"], "training.clients_per_round"),
    (["run", "--set", "training.clients_per_round=1.5"], "training.clients_per_round"),
    (["run", "--set", "training.clients_per_round=50"], "exceeds partition.n_clients"),
    (["run", "--set", "training.warmup_epochs=1"], "training.warmup_epochs"),
    (["run", "--set", "training.grad_clip=-1"], "training.grad_clip"),
    (["run", "--set", "training.rounds=[1, 2]"], "training.rounds"),
    (["run", "--set", "lora.r_min=0"], "lora.r_min"),
    (["run", "--set", "lora.r_min=9", "--set", "lora.r_max=3"], "must not exceed"),
    (["run", "--set", "lora.alpha_policy=wild"], "lora.alpha_policy"),
    (["run", "--set", "lora.dropout=1.0"], "lora.dropout"),
    (["run", "--set", "lora.alpha=-2"], "lora.alpha"),
    (["run", "--set", "partition.scheme=weird"], "partition.scheme"),
    (["run", "--set", "partition.local_test_fraction=1.0"], "partition.local_test_fraction"),
    (["run", "--set", "partition.alpha=0"], "partition.alpha"),
    (["run", "--set", "data.test_fraction=1.5"], "data.test_fraction"),
    (["run", "--set", "data.max_train_samples=0"], "data.max_train_samples"),
    (["run", "--set", "model.name=resnet"], "model.name"),
    (["run", "--set", "model.name=hf"], "model.hf_name_or_path is required"),
    (["run", "--set", "model.pretrain_fraction=1.0"], "model.pretrain_fraction"),
    (["run", "--set", "model.init=safetensors"], "model.weights_path is required"),
    (["run", "--set", "ranking.criteria=[entropy, entropy]"], "duplicates"),
    (["run", "--set", "ranking.uniform_rank=0"], "ranking.uniform_rank"),
    (
        ["run", "--set", "ranking.rerank_every=3", "--set", "ranking.assigner=size"],
        "needs ranking.assigner",
    ),
    (["run", "--set", "aggregation.method=fedavg"], "needs equal ranks"),
    (["run", "--set", "aggregation.method=magic"], "aggregation.method"),
    (["run", "--set", "runtime.device=tpu"], "runtime.device"),
    (["run", "--set", "runtime.backend=gpu"], "runtime.backend"),
    (["run", "--set", "runtime.max_workers=0"], "runtime.max_workers"),
    (["run", "--set", "runtime.task_runner=dask"], "runtime.dask_address is required"),
    (["run", "--set", "runtime.batch_clients=0"], "runtime.batch_clients"),
    (["run", "--set", "tracking.keyed_clients_max=-1"], "tracking.keyed_clients_max"),
    (["run", "--set", "tracking.client_table_every=0"], "tracking.client_table_every"),
    (["run", "--set", "bogus.key=1"], "bogus: unknown setting"),
    (["run", "--set", "training.rounds"], "expected key=value"),
    (["run", "--set", "=3"], "expected key=value"),
    (["run", "--set", "training.rounds=[1"], "not valid YAML"),
    (["ranks", "--set", "partition.n_clients=0"], "partition.n_clients"),
    (["resume"], "the following arguments are required: run_id"),
    (["compare"], "the following arguments are required: --config"),
    (["compare", "--config", "missing.yaml"], "not found"),
    (["ui", "--port", "70000"], "expected a port number 1-65535"),
    (["run", "--bogus"], "unrecognized arguments"),
    (["resume", "no-such-run"], "no checkpoint folder"),
    (["ranks", "--set", "ranking.criteria=[]"], "at least one criterion"),
    (["ranks", "--set", "ranking.budget_params=100"], "ranking.budget_params (100) is below"),
    (["run", "--set", "ranking.budget_params=100"], "ranking.budget_params (100) is below"),
    (["run", "--set", "ranking.rank_caps={0: 1}"], "caps [1] are below the r_min 2"),
    (["config", "--set", "partition.n_clients=0"], "partition.n_clients"),
    (["config", "--set", "aggregation.method=fedavg"], "needs equal ranks"),
    (["config", "--config", "missing.yaml"], "not found"),
    (["config", "--schema", "--set", "seed=1"], "takes no --config or --set"),
    (["config", "--set", "seed=true"], "seed: Input should be a valid integer"),
    (["config", "--set", "seed=1.0"], "seed: Input should be a valid integer"),
    (["config", "--set", "seed=99999999999999999999"], "seed: Input should be less than or"),
    (["config", "--set", "partition.local_test_fraction=0.99"], "less than or equal to 0.5"),
    (["config", "--set", "runtime.max_workers=100000"], "runtime.max_workers: Input should be"),
    (["config", "--set", f"tracking.run_name={'x' * 10_000}"], "at most 250 characters, got"),
    (["config", "--set", "tracking.run_name=../up"], "no control characters or path separators"),
    (["config", "--set", 'tracking.run_name="two\\nlines"'], "got '\\n'"),
]


@pytest.mark.parametrize(("argv", "expected"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(
    argv: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = store_args(tmp_path) if argv[0] == "run" and "--bogus" not in argv else []

    err = cli_error([*argv, *extra], capsys)

    assert expected in err
    assert len(err) < 500  # a 10,000-character value is cut
    assert not (tmp_path / "store").exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_requested_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--set", "runtime.device=cuda", *store_args(tmp_path)])

    assert code == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("raised", "code", "word"),
    [(KeyboardInterrupt, 130, "interrupted"), (Terminated, 143, "terminated")],
)
def test_interrupts_are_one_line_and_the_signal_exit_code(
    raised: type[BaseException],
    code: int,
    word: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def stop(args: object) -> int:
        raise raised

    monkeypatch.setitem(COMMANDS, "ranks", stop)
    before = signal.getsignal(signal.SIGTERM)

    got = main(["ranks"])

    assert got == code
    assert capsys.readouterr().err == f"autorank: {word}; completed rounds are checkpointed\n"
    assert signal.getsignal(signal.SIGTERM) is before  # the CLI's handler does not leak


def test_a_busy_ui_port_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = cli_error(["ui", "--port", str(port), "--uri", f"sqlite:///{tmp_path}/m.db"], capsys)

    assert f"port {port} on 127.0.0.1 is not free" in err
    assert not list(tmp_path.iterdir())


def test_a_port_whose_last_connection_waits_out_time_wait_is_free() -> None:
    import socket

    from flows.cli import _check_port_free

    with socket.socket() as server, socket.socket() as client:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client.connect(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server's side closes first: its port goes to TIME_WAIT
        client.recv(1)
    # As just after a server stopped: refused by a plain bind, free to the servers' bind.
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))

    _check_port_free(port)


def test_a_setting_given_twice_in_a_config_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "twice.yaml"
    config.write_text("training:\n  rounds: 2\n  local_epochs: 1\n  rounds: 50\n")

    err = cli_error(["run", "--config", str(config), *store_args(tmp_path)], capsys)

    assert "line 4: key 'rounds' is given twice" in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "ckpt").exists()


PLACES = [
    ("tracking.uri=http://127.0.0.1:9", "tracking.uri http://127.0.0.1:9: nothing answers"),
    ("tracking.uri=sqlite:////proc/no/mlflow.db", "tracking.uri: '/proc' is not writable"),
    ("tracking.uri=sqlite:///{tmp}/file/mlflow.db", "is a file; expected a folder"),
    ("runtime.checkpoint_dir={tmp}/file/ckpt", "runtime.checkpoint_dir: "),
    ("runtime.checkpoint_dir=/proc/ckpt", "runtime.checkpoint_dir: '/proc' is not writable"),
]


@pytest.mark.parametrize(("setting", "expected"), PLACES, ids=[p for p, _ in PLACES])
def test_unusable_places_are_found_before_the_run(
    setting: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("not a folder")
    argv = ["run", *store_args(tmp_path), "--set", setting.format(tmp=tmp_path)]

    err = cli_error(argv, capsys)

    assert expected in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


STORES = [
    ({"uri": "garbage://x"}, "tracking.uri 'garbage://x': unknown scheme 'garbage'; expected"),
    ({"uri": "sqlite:///notes.txt"}, "'notes.txt' is not an MLflow sqlite store"),
    ({"uri": "sqlite:///other.db"}, "'other.db' is a sqlite database without MLflow's tables"),
    ({"uri": "sqlite:///adir"}, "tracking.uri: 'adir' is a folder; expected sqlite:///"),
    ({"uri": "file:///proc/nope"}, "tracking.uri 'file:///proc/nope' is MLflow's file store"),
    (
        {"env": "::not a uri::"},
        "tracking.uri (from MLFLOW_TRACKING_URI) '::not a uri::' is a path, which MLflow takes",
    ),
]


@pytest.mark.parametrize(("store", "expected"), STORES, ids=[e[:30] for _, e in STORES])
def test_a_tracking_store_the_run_cannot_use_is_refused_before_anything(
    store: dict[str, str], expected: str, tmp_path: Path
) -> None:
    import sqlite3

    (tmp_path / "notes.txt").write_text("not a database\n" * 100)
    (tmp_path / "adir").mkdir()
    with sqlite3.connect(tmp_path / "other.db") as other:
        other.execute("CREATE TABLE notes (line TEXT)")
    args = ["run", "--set", "runtime.checkpoint_dir=ckpt"]
    args += ["--set", f"tracking.uri={store['uri']}"] if "uri" in store else []
    env = {"MLFLOW_TRACKING_URI": store["env"]} if "env" in store else {}

    err = refused_in(tmp_path, args, env)

    assert err.startswith("autorank: error: ") and expected in err, err


class _Answer(http.server.BaseHTTPRequestHandler):
    """A stand-in HTTP server: ``status`` and ``body`` for every GET."""

    status, body = 404, b"<html>not here</html>"

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (404, b"<html>not here</html>", "answers, but not as an MLflow tracking server (HTTP 404"),
        (401, b"", "the server refused access (HTTP 401); set MLFLOW_TRACKING_TOKEN"),
        (200, b"<html>a web page</html>", "no MLflow answer from /api/2.0/mlflow/experiments"),
        (200, b'{"experiments": []}', None),
    ],
    ids=["other-server", "needs-login", "not-json", "mlflow"],
)
def test_an_http_tracking_uri_must_answer_mlflow_s_api(
    status: int, body: bytes, expected: str | None, tmp_path: Path
) -> None:
    from flows.places import check_places

    handler = type("Handler", (_Answer,), {"status": status, "body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    config = tiny_config(tmp_path, tracking={"uri": uri})
    try:
        if expected is None:
            check_places(config)
        else:
            with pytest.raises(ValueError, match=re.escape(expected)):
                check_places(config)
    finally:
        server.shutdown()
        server.server_close()


DASK = [
    ("tcp://127.0.0.1:9", "runtime.dask_address: nothing answers at 127.0.0.1:9"),
    ("scheduler", "expected tcp://host:port of a scheduler"),
]


@pytest.mark.parametrize(("address", "expected"), DASK, ids=[a for a, _ in DASK])
def test_an_unreachable_dask_scheduler_is_found_before_the_run(
    address: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", *store_args(tmp_path), "--set", "runtime.task_runner=dask"]
    argv += ["--set", f"runtime.dask_address={address}"]

    err = cli_error(argv, capsys)

    assert expected in err
    assert not list(tmp_path.iterdir())


def test_a_failure_inside_a_run_is_one_line_with_the_resume_command(
    prefect_harness: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow.tracking import MlflowClient

    import tasks.server

    def away(*args: object, **kwargs: object) -> None:
        raise ConnectionError("the tracking server went away")

    monkeypatch.setattr(tasks.server, "server_step", away)
    argv = ["run", *store_args(tmp_path), "--set", "partition.n_clients=4"]
    stored_before = storage_files()

    code = main([*argv, "--set", "training.rounds=2", "--set", "model.pretrain_epochs=1"])

    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err and "ERROR" not in err, err
    last = err.strip().splitlines()[-1]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/store/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("autorank").experiment_id])
    assert last == (
        "autorank: ConnectionError: the tracking server went away; "
        f"`{autorank_command('resume', run.info.run_id)}` continues it (--verbose: traceback)"
    )
    assert run.info.status == "FAILED"
    assert storage_files() == stored_before  # no pickled exception left by Prefect


def test_version_and_every_subcommand_has_a_description(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"autorank {version('autorank')}"
    for command in COMMANDS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        lines = capsys.readouterr().out.splitlines()
        description = lines[lines.index("") + 1]  # the paragraph after the usage
        assert len(description) > 20 and not description.startswith(("positional", "options")), (
            command,
            lines[:4],
        )


def test_config_prints_the_yaml_a_run_would_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    file = ROOT / "configs" / "default.yaml"
    overrides = ["partition.n_clients=20", "lora.layer_ranges={fc1: {r_min: 4, r_max: 16}}"]
    monkeypatch.chdir(tmp_path)

    code = main(["config", "--config", str(file), *[f"--set={o}" for o in overrides]])

    printed = yaml.safe_load(capsys.readouterr().out)
    assert code == 0
    assert parse_config(printed) == load_config(file, overrides)
    assert printed["partition"]["n_clients"] == 20
    assert printed["lora"]["layer_ranges"] == {"fc1": {"r_min": 4, "r_max": 16}}
    assert not list(tmp_path.iterdir())  # no tracking store, no checkpoint folder


def test_config_shows_the_tracking_uri_from_the_environment_unless_the_config_names_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")

    main(["config"])
    from_environment = yaml.safe_load(capsys.readouterr().out)["tracking"]["uri"]
    main(["config", "--set", "tracking.uri=sqlite:///chosen.db"])
    chosen = yaml.safe_load(capsys.readouterr().out)["tracking"]["uri"]

    assert from_environment == "http://127.0.0.1:5999"
    assert chosen == "sqlite:///chosen.db"


def test_config_schema_gives_each_setting_its_type_default_and_meaning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    meaning = LoraConfig.model_fields["r_max"].description

    main(["config", "--schema"])
    text = capsys.readouterr().out
    main(["config", "--schema", "--json"])
    schema = json.loads(capsys.readouterr().out)

    entry = text.split("\n  lora.r_max ", 1)[1].split("\n  lora.", 1)[0]
    assert " ".join(entry.split()) == f"(int >= 1, default 32): {meaning}"
    assert "\nlora: LoRA adapters" in text
    assert max(len(line) for line in text.splitlines()) <= 100
    assert schema["$defs"]["LoraConfig"]["properties"]["r_max"]["description"] == meaning


def test_help_lists_the_config_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])

    lines = capsys.readouterr().out.split("\n")
    assert exit_.value.code == 0
    assert any(line.split()[:2] == ["config", "print"] for line in lines)


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"]])
def test_help_states_where_runs_are_tracked(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(argv)

    text = " ".join(capsys.readouterr().out.split())
    assert "tracking.uri" in text and "else the MLFLOW_TRACKING_URI environment variable" in text


def test_config_loads_neither_torch_nor_prefect_nor_mlflow(tmp_path: Path) -> None:
    script = (
        "import sys; from flows.cli import main; code = main(['config']); "
        "print(code, sorted({'torch', 'prefect', 'mlflow'} & set(sys.modules)))"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}

    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.stdout.splitlines()[-1] == "0 []", done.stderr
    assert "uri: sqlite:///mlruns/mlflow.db" in done.stdout
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:9/api", "no answer from http://127.0.0.1:9/api/health"),
        ("::garbage::", "PREFECT_API_URL '::garbage::' is not an http(s) URL"),
        ("{web}/api", "no answer from {web}/api/health (Not Found)"),
    ],
    ids=["dead", "garbage", "not-prefect"],
)
def test_a_prefect_api_url_that_does_not_answer_is_refused_before_anything(
    url: str, expected: str, tmp_path: Path
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    web = f"http://127.0.0.1:{server.server_address[1]}"
    args = ["run", "--set", "tracking.uri=sqlite:///mlruns/mlflow.db"]
    try:
        err = refused_in(tmp_path, args, {"PREFECT_API_URL": url.format(web=web)})
    finally:
        server.shutdown()
        server.server_close()

    assert err.startswith("autorank: error: ") and expected.format(web=web) in err, err
    assert "expected the API of a running Prefect server" in err


def test_a_prefect_api_url_that_answers_its_health_check_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from flows.places import check_prefect_api

    handler = type("Handler", (_Answer,), {"status": 200, "body": b"true"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{server.server_address[1]}/api")
    try:
        check_prefect_api()
    finally:
        server.shutdown()
        server.server_close()


def test_more_workers_than_cores_on_threads_is_refused_before_anything(tmp_path: Path) -> None:
    cores = os.cpu_count() or 1
    tiny = ["partition.n_clients=4", "training.rounds=1", "model.pretrain_epochs=0"]
    args = ["run", *(a for s in tiny for a in ("--set", s))]
    args += ["--set", f"runtime.max_workers={cores + 1}", "--set", "runtime.checkpoint_dir=ckpt"]

    err = refused_in(tmp_path, args)

    assert f"runtime.max_workers is {cores + 1} but this machine has {cores} cores" in err


NONFINITE = [
    ("training.lr=.inf", "training.lr: Input should be a finite number (got inf)"),
    ("runtime.dask_resources={GPU: .nan}", "runtime.dask_resources.GPU: Input should be a finite"),
]


@pytest.mark.parametrize(("setting", "expected"), NONFINITE, ids=[s for s, _ in NONFINITE])
def test_a_nonfinite_setting_is_refused_before_anything(
    setting: str, expected: str, tmp_path: Path
) -> None:
    args = ["run", "--set", setting, "--set", "runtime.checkpoint_dir=ckpt"]

    err = refused_in(tmp_path, args)

    assert expected in err


def test_nonfinite_data_is_refused_with_its_file_and_column_before_anything(
    tmp_path: Path,
) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    features = {f"f{i}": np.random.default_rng(i).normal(size=60) for i in range(40)}
    features["f7"][11] = np.nan
    pq.write_table(pa.table({**features, "label": np.arange(60) % 3}), tmp_path / "nan.parquet")
    args = ["run", "--set", "data.name=parquet", "--set", "data.path=nan.parquet"]
    args += ["--set", "partition.n_clients=3", "--set", "runtime.checkpoint_dir=ckpt"]

    err = refused_in(tmp_path, args)

    assert "parquet 'nan.parquet': column 'f7' has 1 NaN or infinite value(s)" in err


def test_an_empty_idx_file_is_named_before_anything(tmp_path: Path) -> None:
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (tmp_path / stem).write_bytes(b"")
    for stem in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / stem).write_bytes(b"")
    args = [
        "run",
        "--set",
        "data.name=mnist",
        "--set",
        "data.path=.",
        "--set",
        "runtime.checkpoint_dir=ckpt",
    ]

    err = refused_in(tmp_path, args)

    assert "train-images-idx3-ubyte: the file is empty; expected an IDX file" in err


CONFIG_FILES = [
    ("adir", "config file 'adir' is a folder; expected a YAML file"),
    ("/dev/null", "config file '/dev/null' is not a regular file; expected a YAML file"),
    ("binary.yaml", "config file 'binary.yaml' is not UTF-8 text (byte 0xff at offset 8)"),
    ("deep.yaml", "config file 'deep.yaml': the YAML nests too deep to read"),
]


@pytest.mark.parametrize(("name", "expected"), CONFIG_FILES, ids=[n for n, _ in CONFIG_FILES])
def test_a_config_file_that_cannot_be_read_is_refused_before_anything(
    name: str, expected: str, tmp_path: Path
) -> None:
    (tmp_path / "adir").mkdir()
    (tmp_path / "binary.yaml").write_bytes(b"seed: 1\n\xff\xfe\x00\x01")
    (tmp_path / "deep.yaml").write_text("seed: " + "[" * 5000 + "]" * 5000 + "\n")

    err = refused_in(tmp_path, ["run", "--config", name])

    assert err.startswith(f"autorank: error: {expected}")


UI_STORES = [
    ("garbage://x", "--uri 'garbage://x': unknown scheme 'garbage'; expected sqlite:///"),
    ("sqlite:////proc/nope/x.db", "--uri: '/proc' is not writable"),
]


@pytest.mark.parametrize(("uri", "expected"), UI_STORES, ids=[u for u, _ in UI_STORES])
def test_ui_refuses_a_store_a_run_could_not_use_before_announcing_it(
    uri: str, expected: str, tmp_path: Path
) -> None:
    err = refused_in(tmp_path, ["ui", "--uri", uri])

    assert err.startswith(f"autorank: error: {expected}")


def test_third_party_caches_stay_in_the_working_folder_and_their_bars_are_quiet(
    tmp_path: Path,
) -> None:
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    rows = [f"{['bad day', 'fine film', 'great song'][i % 3]} {i},{i % 3}" for i in range(30)]
    (work / "texts.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    settings = ["data.name=text", "data.path=texts.csv", "model.name=text_classifier"]
    settings += ["model.hf_name_or_path=all-MiniLM-L6-v2", "partition.n_clients=3"]
    settings += ["partition.scheme=iid", "lora.r_max=8"]
    keep = ("PATH", "LANG", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k in keep}
    root = str(Path(__file__).resolve().parents[2])

    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "ranks", *(a for s in settings for a in ("--set", s))],
        cwd=work,
        env=env | {"HOME": str(home), "PYTHONPATH": root},
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""  # no "Generating train split", "Map:" or "Loading weights" bars
    assert list(home.iterdir()) == []
    assert (work / ".cache" / "huggingface" / "datasets").is_dir()


def _cli_process(args: list[str], folder: Path, stdout: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=folder,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        stdout=stdout,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize(
    "args",
    [["config", "--schema"], ["config", "--schema", "--json"], ["config"], ["--help"]],
    ids=["schema", "schema-json", "config", "help"],
)
def test_a_closed_stdout_ends_the_command_quietly_with_0(args: list[str], tmp_path: Path) -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write: every write meets EPIPE
    try:
        proc = _cli_process(args, tmp_path, write)
    finally:
        os.close(write)
    _, err = proc.communicate(timeout=60)

    assert proc.returncode == 0, err.decode()[-2000:]
    assert not err


def test_a_reader_that_stops_after_one_line_ends_the_command_quietly_with_0(
    tmp_path: Path,
) -> None:
    proc = _cli_process(["config", "--schema"], tmp_path, subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()  # `| head -1`
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=60)

    assert first.startswith(b"Settings:")
    assert proc.returncode == 0, err.decode()[-2000:]
    assert not err
