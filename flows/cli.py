"""The `autorank` command line: `ranks`, `run`, `resume`, `ui`.

Bad input (config, data, flags) ends with one line on stderr and exit code 2, never a traceback.
Heavy imports (torch, Prefect, MLflow) happen inside the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Before anything imports MLflow or Prefect: no telemetry, nothing reaching out.
for _key, _value in {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}.items():
    os.environ.setdefault(_key, _value)

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit code 2."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        sys.stderr.write(f"autorank: error: {message} (see autorank --help)\n")
        raise SystemExit(EXIT_BAD_INPUT)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="experiment YAML (default: built-in defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set partition.n_clients=20 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="autorank", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ranks = sub.add_parser("ranks", help="partition, profile and print each client's rank")
    _add_config_args(ranks)
    ranks.add_argument("--json", action="store_true", help="print the decision as JSON")
    return parser


def _cmd_ranks(args: argparse.Namespace) -> int:
    from flows.ranking import rank_table

    from autorank.config import load_config

    config = load_config(args.config, args.overrides)
    assignment = rank_table(config)
    if args.json:
        print(json.dumps(assignment.to_json(), indent=2))
    else:
        print(format_rank_table(assignment.to_json()))
    return 0


def format_rank_table(decision: dict[str, Any]) -> str:
    """A per-client table of the rank decision, with the CRITIC weights underneath."""
    head = f"{'client':>6} {'samples':>8} {'labels':>6} {'entropy':>8} {'gini':>6} {'close':>6} "
    head += f"{'rank':>5}  layer ranks"
    lines = [f"assigner: {decision['assigner']}", head]
    for row in decision["clients"]:
        close = row.get("closeness")
        close_txt = f"{close:6.3f}" if close is not None else f"{'-':>6}"
        layers = " ".join(f"{k}={v}" for k, v in row["layer_ranks"].items())
        lines.append(
            f"{row['client']:>6} {row['samples']:>8} {row['labels_held']:>6} "
            f"{row['entropy']:8.4f} {row['gini_simpson']:6.4f} {close_txt} {row['rank']:>5}  {layers}"
        )
    weights = decision.get("weights") or {}
    if weights:
        lines.append("CRITIC weights: " + ", ".join(f"{k}={v:.4f}" for k, v in weights.items()))
    return "\n".join(lines)


COMMANDS = {"ranks": _cmd_ranks}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `autorank` console script."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        sys.stderr.write(f"autorank: error: {message}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write("autorank: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
