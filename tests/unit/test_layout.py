"""The layout's rules, read from the source: which layer may import which, and no circles.

Imports are read with ``ast`` from every file, those under ``TYPE_CHECKING`` and inside
functions included: a circle held by a deferred import is still a circle a reader has to hold.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any, get_args

import pytest

from autorank.config import ExperimentConfig, config_digest

ROOT = Path(__file__).resolve().parents[2]

# The library's floors, lowest first: a package imports from its own floor or below, never up.
FLOORS: tuple[frozenset[str], ...] = (
    frozenset({"config", "models"}),
    frozenset({"data", "ranking", "lora"}),
    frozenset({"reporting", "merge", "engine"}),
    frozenset({"recipe", "rounds"}),
    frozenset({"serving"}),
)
# Packages that never import torch, however indirectly.
TORCH_FREE = frozenset({"config", "data", "ranking", "reporting"})


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources(package: str) -> Iterator[Path]:
    yield from sorted((ROOT / package).rglob("*.py"))


@cache
def modules() -> frozenset[str]:
    return frozenset(module_name(p) for top in ("autorank", "tasks", "flows") for p in sources(top))


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, resolved to a module of the project where it names one
    (``from autorank.config import X`` -> ``autorank.config``; ``from autorank import config``
    -> ``autorank.config``); other modules by their top-level name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            named = (f"{base}.{alias.name}" for alias in node.names)
            found.update(name for name in named if name in modules())
    return found


@cache
def graph() -> dict[str, frozenset[str]]:
    """Module -> the project modules it imports (a module importing its own package's
    ``__init__`` through a sibling is not counted: that is how a package exposes names)."""
    edges: dict[str, frozenset[str]] = {}
    for top in ("autorank", "tasks", "flows"):
        for path in sources(top):
            name = module_name(path)
            edges[name] = frozenset(m for m in imported(path) if m in modules() and m != name)
    return edges


def top_level_imports(top: str) -> dict[str, set[str]]:
    return {module_name(path): {m.split(".")[0] for m in imported(path)} for path in sources(top)}


def package_of(module: str) -> str:
    """``autorank.ranking.mcda`` -> ``ranking``; ``autorank.recipe`` -> ``recipe``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def cycles(edges: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize(
    ("top", "forbidden"),
    [("autorank", {"prefect", "mlflow", "tasks", "flows"}), ("tasks", {"flows"})],
)
def test_lower_layers_never_import_the_upper_ones(top: str, forbidden: set[str]) -> None:
    offending = {
        module: sorted(names & forbidden)
        for module, names in top_level_imports(top).items()
        if names & forbidden
    }

    assert offending == {}


def test_the_library_has_no_import_circles() -> None:
    library = {m: e for m, e in graph().items() if m.startswith("autorank")}

    assert cycles(library) == []


def test_the_cycle_finder_sees_a_circle() -> None:
    edges = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset()}

    assert cycles(edges) == [["a", "b", "c"]]


def test_default_config_digest_is_pinned() -> None:
    # Checkpoints bind to this digest: a change here makes every saved run refuse to resume.
    assert config_digest(ExperimentConfig()) == "168c22978791b7e0"


def test_serving_names_stay_importable() -> None:
    # tasks/mlflow_model.py is copied into every logged MLflow model and imports these on load.
    from autorank.serving import Classifier, load_classifier

    assert callable(load_classifier)
    assert isinstance(Classifier, type)


def floor_of(package: str) -> int | None:
    return next((i for i, floor in enumerate(FLOORS) if package in floor), None)


def test_no_package_imports_from_a_floor_above_its_own() -> None:
    upward = []
    for module, targets in graph().items():
        here = floor_of(package_of(module)) if module.startswith("autorank.") else None
        for target in targets:
            there = floor_of(package_of(target)) if target.startswith("autorank.") else None
            if here is not None and there is not None and there > here:
                upward.append(f"{module} -> {target}")

    assert upward == []


def test_torch_free_packages_reach_no_torch() -> None:
    edges = graph()
    reached: dict[str, set[str]] = {}
    for module in edges:
        if package_of(module) not in TORCH_FREE or not module.startswith("autorank."):
            continue
        seen, todo = set(), [module]
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo.extend(edges.get(current, ()))
        torchy = {m for m in seen if "torch" in top_level_imports_of(m)}
        if torchy:
            reached[module] = torchy

    assert reached == {}


def top_level_imports_of(module: str) -> set[str]:
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return {m.split(".")[0] for m in imported(path)}


def _names(literal: Any) -> set[str]:
    return set(get_args(literal))


def test_every_registry_holds_exactly_the_names_the_config_accepts() -> None:
    from autorank.config import AggregatorName, AssignerName, ModelConfig, RuntimeConfig, Scheme
    from autorank.config.vocab import TEXT_DATA
    from autorank.data.datasets import GENERATED, KNOWN
    from autorank.data.partition import SCHEMES
    from autorank.data.sources import SOURCES
    from autorank.data.text import TEXT_SOURCES
    from autorank.engine.factory import ENGINES
    from autorank.merge.aggregators import AGGREGATORS
    from autorank.models.zoo import BUILDERS, MODEL_NAMES
    from autorank.ranking.assigners import ASSIGNERS

    backends = _names(RuntimeConfig.model_fields["backend"].annotation) - {"auto"}

    assert set(ASSIGNERS) == _names(AssignerName)
    assert set(AGGREGATORS) == _names(AggregatorName)
    assert set(SCHEMES) == _names(Scheme)
    assert set(BUILDERS) == _names(ModelConfig.model_fields["name"].annotation) == set(MODEL_NAMES)
    assert set(ENGINES) == backends
    assert set(SOURCES) | set(TEXT_SOURCES) | set(GENERATED) == {
        n for n in KNOWN if not n.startswith("hf:")
    }
    assert not set(SOURCES) & set(TEXT_SOURCES)
    assert set(TEXT_SOURCES) == set(TEXT_DATA)
