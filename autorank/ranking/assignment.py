"""The rank decision everyone reads: one ``RankDecision`` per client, gathered in a
``RankAssignment`` that round-trips through JSON (the tracked ``rank_decision.json`` and the
checkpoint's copy)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RankDecision:
    """The rank one client received, and what it was based on.

    Attributes:
        client: client index.
        n_samples: training samples the client holds.
        labels_held: classes with at least one sample.
        criteria: criterion name -> value used (empty for assigners that use none).
        closeness: TOPSIS closeness in [0, 1] (``autorank`` only, else None).
        rank: the rank on the global ``[r_min, r_max]`` scale.
        layer_ranks: adapted layer name -> rank inside that layer's own range.
        cap: the largest rank the client's device holds (``ranking.rank_caps`` or a drawn
            ``cap_tiers`` tier), None when uncapped.
    """

    client: int
    n_samples: int
    labels_held: int
    criteria: dict[str, float]
    closeness: float | None
    rank: int
    layer_ranks: dict[str, int]
    cap: int | None = None


@dataclass(frozen=True)
class RankAssignment:
    """The result of one assigner over all clients.

    Attributes:
        assigner: the registered name that produced it.
        decisions: one per client, in the order of the profiles given.
        weights: CRITIC weight per criterion (``autorank`` only, else empty).
        budget_params: ``ranking.budget_params``, None without a budget.
        total_params: trainable LoRA parameters over all clients at these ranks (head not
            counted); None when the layer sizes were not given.
        scale: the factor the budget scaled the assigner's ranks by; None without a budget.
    """

    assigner: str
    decisions: tuple[RankDecision, ...]
    weights: dict[str, float] = field(default_factory=dict)
    budget_params: int | None = None
    total_params: int | None = None
    scale: float | None = None

    def ranks(self) -> list[dict[str, int]]:
        """Per client (in decision order), adapted layer name -> rank."""
        return [dict(d.layer_ranks) for d in self.decisions]

    def to_json(self) -> dict[str, Any]:
        """A ``json.dumps``-ready record: the assigner, the weights and one row per client."""
        rows = [
            {
                "client": d.client,
                "samples": d.n_samples,
                "labels_held": d.labels_held,
                **{name: float(value) for name, value in d.criteria.items()},
                "closeness": None if d.closeness is None else float(d.closeness),
                "rank": d.rank,
                "layer_ranks": dict(d.layer_ranks),
                "cap": d.cap,
            }
            for d in self.decisions
        ]
        weights = {name: float(w) for name, w in self.weights.items()}
        return {
            "assigner": self.assigner,
            "weights": weights,
            "budget_params": self.budget_params,
            "total_params": self.total_params,
            "scale": self.scale,
            "clients": rows,
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> RankAssignment:
        """Rebuild an assignment from ``to_json``'s record (e.g. from a checkpoint); records
        written before caps and budgets existed read as uncapped and without a budget."""
        fixed = {"client", "samples", "labels_held", "closeness", "rank", "layer_ranks", "cap"}
        decisions = tuple(
            RankDecision(
                client=int(row["client"]),
                n_samples=int(row["samples"]),
                labels_held=int(row["labels_held"]),
                criteria={k: float(v) for k, v in row.items() if k not in fixed},
                closeness=None if row["closeness"] is None else float(row["closeness"]),
                rank=int(row["rank"]),
                layer_ranks={k: int(v) for k, v in row["layer_ranks"].items()},
                cap=_int_or_none(row.get("cap")),
            )
            for row in record["clients"]
        )
        weights = {k: float(v) for k, v in record["weights"].items()}
        scale = record.get("scale")
        return cls(
            str(record["assigner"]),
            decisions,
            weights,
            budget_params=_int_or_none(record.get("budget_params")),
            total_params=_int_or_none(record.get("total_params")),
            scale=None if scale is None else float(scale),
        )


def decision_columns(record: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``to_json``'s rows as columns: ``client``, ``samples``, ``labels_held``, each criterion,
    ``closeness``, ``rank``, ``cap`` and one ``rank/<layer>`` per adapted layer (a columnar
    table of thousands of clients, read back by ``rows_of_columns``)."""
    rows = record["clients"]
    if not rows:
        return {}
    layers = list(rows[0]["layer_ranks"])
    names = [k for k in rows[0] if k != "layer_ranks"]
    columns: dict[str, list[Any]] = {name: [row[name] for row in rows] for name in names}
    for layer in layers:
        columns[f"rank/{layer}"] = [row["layer_ranks"][layer] for row in rows]
    return columns


def rows_of_columns(columns: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """``decision_columns`` back into ``to_json``'s rows."""
    if not columns:
        return []
    layers = [k[len("rank/") :] for k in columns if k.startswith("rank/")]
    plain = [k for k in columns if not k.startswith("rank/")]
    n = len(next(iter(columns.values())))
    rows = []
    for i in range(n):
        row: dict[str, Any] = {k: columns[k][i] for k in plain}
        row["layer_ranks"] = {layer: columns[f"rank/{layer}"][i] for layer in layers}
        rows.append(row)
    return rows


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def max_ranks(ranks: Sequence[Mapping[str, int]]) -> dict[str, int]:
    """Per target, the largest rank any client holds."""
    return {key: max(r[key] for r in ranks) for key in ranks[0]}
