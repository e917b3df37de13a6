"""The README's Python snippets run as written: in order, in one namespace, in a fresh folder
that holds a finished run of the quickstart's experiment (small), as after the quickstart."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What the quickstart leaves in the folder, at a tiny size: a finished run in the default store;
# and a finished run of the text section's experiment, which its snippet reads.
QUICKSTART = """
from pathlib import Path
from autorank.config import load_config
from flows.experiment import federated_training

federated_training(config=load_config(None, {tiny!r}))
federated_training(config=load_config(Path({text_config!r}), {tiny_text!r}))
"""
TINY = [
    "partition.n_clients=4",
    "training.rounds=2",
    "training.warmup_epochs=2",
    "model.pretrain_epochs=1",
    "runtime.max_workers=1",
]
TINY_TEXT = [
    "data.max_train_samples=60",
    "data.max_test_samples=12",
    "data.max_length=16",
    "partition.n_clients=2",
    "training.clients_per_round=2",
    "training.rounds=1",
    "training.local_steps=1",
    "aggregation.early_method=null",
    "aggregation.early_rounds=0",
    "aggregation.early_when=always",
    "runtime.max_workers=1",
]

# Each snippet runs in the namespace the ones before it left, as a reader's session would.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
exec(sys.argv[1], dict(namespace))
for number, block in enumerate(json.loads(open(sys.argv[2]).read()), 1):
    exec(compile(block, f"README.md python snippet {number}", "exec"), namespace)
    print(f"snippet {number} ran", flush=True)
"""


def python_snippets(text: str) -> list[str]:
    """The ```python blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def _setup() -> str:
    text_config = str(ROOT / "configs" / "text_sentiment.yaml")
    return QUICKSTART.format(tiny=TINY, text_config=text_config, tiny_text=TINY_TEXT)


def test_the_readme_s_python_snippets_run_as_written(tmp_path: Path) -> None:
    snippets = python_snippets((ROOT / "README.md").read_text())
    (tmp_path / "snippets.json").write_text(json.dumps(snippets))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env |= {
        "PYTHONPATH": str(ROOT),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }

    done = subprocess.run(
        [sys.executable, "-c", RUNNER, _setup(), "snippets.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert len(snippets) >= 3
    assert done.returncode == 0, done.stderr[-4000:]
    ran = [line for line in done.stdout.splitlines() if line.startswith("snippet ")]
    assert ran == [f"snippet {n} ran" for n in range(1, len(snippets) + 1)], done.stdout[-3000:]
