"""Runs started at once in one fresh folder all succeed (a run is resumed by one process only:
tests/unit/rounds/test_checkpoint.py)."""

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from autorank.config import to_yaml
from tests.flows.conftest import tiny_config

# Two are a race on every store they create (MLflow's sqlite schema, Prefect's database); a
# third costs a third more start-up on two cores and races the same way.
RUNS = 2


def test_runs_started_at_once_in_a_fresh_folder_all_succeed(tmp_path: Path) -> None:
    # The default layout, relative to the folder: one new MLflow store, one new Prefect home.
    config = tiny_config(
        tmp_path,
        model={"pretrain_epochs": 0},
        training={"rounds": 1, "warmup_epochs": 2},
        tracking={"uri": "sqlite:///mlruns/mlflow.db"},
        runtime={"checkpoint_dir": "mlruns/checkpoints", "max_workers": 1},
    )
    (tmp_path / "config.yaml").write_text(to_yaml(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "run",
                "--config",
                "config.yaml",
                "--set",
                f"seed={seed}",
            ],
            cwd=tmp_path,
            env=env | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in range(RUNS)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]

    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id], max_results=10)
    assert sorted(r.data.params["seed"] for r in runs) == [str(s) for s in range(RUNS)]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(r.data.metrics["global/accuracy"] > 0 for r in runs)
