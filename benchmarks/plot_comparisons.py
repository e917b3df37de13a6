"""One accuracy-per-round figure over the runs of several comparisons (mean over seeds).

Each comparison plots its own methods; this puts the methods of several comparisons run on the
same partitions and seeds (for instance two grids over different assigners) in one figure:

    .venv/bin/python benchmarks/plot_comparisons.py PARENT_RUN_ID [PARENT_RUN_ID ...] \
        --out accuracy.png [--uri sqlite:///mlruns/mlflow.db] [--title "..."]

Methods are named like their runs without the seed (``autorank-rbla``); a method found in two
comparisons is an error, since their seeds would be averaged together.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from autorank.config import TrackingConfig
from autorank.reporting.plots import accuracy_curves
from autorank.reporting.summary import mean_curve
from tasks import tracking

_SEED = re.compile(r"-s\d+$")


def method_series(uri: str, parents: list[str]) -> dict[str, list[list[float]]]:
    """Per method, the global accuracy series of each finished seed, over all ``parents``."""
    found: dict[str, list[list[float]]] = {}
    owner: dict[str, str] = {}
    for parent in parents:
        for child in tracking.child_runs(uri, parent):
            if child.status != "FINISHED":
                continue
            method = _SEED.sub("", child.name)
            if owner.setdefault(method, parent) != parent:
                raise SystemExit(f"method {method!r} is in both {owner[method]} and {parent}")
            found.setdefault(method, []).append(
                tracking.metric_series(uri, child.run_id, "global/accuracy")
            )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parents", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--uri", default=TrackingConfig().uri)
    parser.add_argument("--title", default="Global test accuracy per round (mean over seeds)")
    args = parser.parse_args()

    curves = {}
    for method, runs in method_series(args.uri, args.parents).items():
        curves[method] = mean_curve(runs)
        rounds = len(curves[method])
        print(f"{method}: {len(runs)} seeds, {rounds} rounds, best mean {max(curves[method]):.4f}")
    accuracy_curves(curves, title=args.title).savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
