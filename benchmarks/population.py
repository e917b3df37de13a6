"""A population sweep: the same run (same cohort per round) at growing registered populations.

Each population runs ``autorank run`` in a fresh process on Synthetic(alpha, beta) and prints, from
its progress lines and the process itself: seconds to each phase, the seconds before round 1
trains, each round's seconds, peak RSS, and the bytes of the MLflow store and the checkpoints.
The first population is the reference the others are read against (ratios). Nothing asserted:

    .venv/bin/python benchmarks/population.py --clients 1000 10000 100000 \\
        [--per-round 1000] [--rounds 5] [--repeat 3] [--set training.lr=0.01 ...]

With ``--repeat`` the populations run in turn that many times (interleaved, so that a slow spell
of a shared machine falls on all of them) and each figure is the median over the repeats.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

AUTORANK = Path(sys.executable).with_name("autorank")
ROUND = re.compile(r"round (\d+)/\d+: .*\(([\d.]+) s\)")
PHASES = {
    "pre-training": "pre-training the base",
    "engines": "cohort(s) of up to",
    "ranks": "ranks: each client's decided",
    "warm-up": "warm-up: ",
    "warm-up done": "warm-up done",
}


def _size(path: Path) -> int:
    """Bytes under ``path`` (a file or a folder), 0 when missing."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _peak_kb(pid: int) -> int | None:
    """The process's peak RSS so far (VmHWM), None once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return int(status.split("VmHWM:")[1].split()[0])


def measure(n_clients: int, per_round: int, rounds: int, sets: list[str], where: Path) -> dict:
    """One run at ``n_clients``: phase times, round seconds, peak RSS, stored bytes."""
    where.mkdir(parents=True)
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{where}/mlflow.db")
    argv = [str(AUTORANK), "run", "--set", "data.name=synthetic"]
    argv += ["--set", f"partition.n_clients={n_clients}"]
    argv += ["--set", f"training.clients_per_round={per_round}"]
    argv += ["--set", f"training.rounds={rounds}", "--set", f"runtime.checkpoint_dir={where}/ckpt"]
    for setting in sets:
        argv += ["--set", setting]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=where, env=env, stderr=subprocess.PIPE, text=True)
    seen: dict[str, float] = {}
    rounds_s: list[float] = []
    first_round_start = None
    peak = 0
    assert proc.stderr is not None
    for line in proc.stderr:  # progress lines; VmHWM read between them
        now = time.perf_counter() - start
        peak = max(peak, _peak_kb(proc.pid) or 0)
        for phase, text in PHASES.items():
            if text in line and phase not in seen:
                seen[phase] = now
        found = ROUND.search(line)
        if found:
            rounds_s.append(float(found.group(2)))
            if first_round_start is None:
                first_round_start = now - float(found.group(2))
    code = proc.wait()
    if code != 0:
        raise SystemExit(f"{n_clients} clients: autorank run exited {code}")
    return {
        "clients": n_clients,
        "wall": time.perf_counter() - start,
        "phases": seen,
        "before_round_1": first_round_start,
        "rounds": rounds_s,
        "peak_mb": peak / 1024,
        "mlflow_mb": _size(where / "mlflow.db") / 1e6,
        "artifacts_mb": _size(where / "artifacts") / 1e6,  # beside the store (tasks.tracking)
        "ckpt_mb": _size(where / "ckpt") / 1e6,
    }


def _median(runs: list[dict]) -> dict:
    """Every figure of one population as its median over repeated runs (rounds: round by
    round); the phases of the first run."""
    out = dict(runs[0])
    for key in ("wall", "before_round_1", "peak_mb", "mlflow_mb", "artifacts_mb", "ckpt_mb"):
        out[key] = statistics.median(r[key] for r in runs)
    rounds = zip(*(r["rounds"] for r in runs), strict=True)
    out["rounds"] = [statistics.median(col) for col in rounds]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--per-round", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], dest="sets")
    args = parser.parse_args()
    runs: dict[int, list[dict]] = {n: [] for n in args.clients}
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(args.repeat):
            for n in args.clients:
                where = Path(tmp) / f"{n}-{attempt}"
                runs[n].append(measure(n, args.per_round, args.rounds, args.sets, where))
    results = [_median(runs[n]) for n in args.clients]
    ref = results[0]
    ref_round = sum(ref["rounds"][1:]) / max(1, len(ref["rounds"]) - 1)
    print(
        f"{args.per_round} clients a round, {args.rounds} rounds, extra: {args.sets or 'none'}, "
        f"median of {args.repeat} run(s) each"
    )
    header = "clients  wall s  before round 1 s  mean round s (x ref)  peak RSS MB (x ref)"
    print(header + "  MLflow db MB  artifacts MB  checkpoints MB  phases (s from start)")
    for r in results:
        mean_round = sum(r["rounds"][1:]) / max(1, len(r["rounds"]) - 1)  # round 1 warms up
        phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items())
        print(
            f"{r['clients']:>7}  {r['wall']:6.1f}  {r['before_round_1']:16.1f}  "
            f"{mean_round:8.2f} ({mean_round / ref_round:.2f}x)  "
            f"{r['peak_mb']:8.0f} ({r['peak_mb'] / ref['peak_mb']:.2f}x)  "
            f"{r['mlflow_mb']:12.1f}  {r['artifacts_mb']:12.1f}  {r['ckpt_mb']:14.1f}  {phases}"
        )
        print(f"         rounds: {', '.join(f'{s:.2f}' for s in r['rounds'])}")


if __name__ == "__main__":
    main()
