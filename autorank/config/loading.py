"""Reading a config: YAML files, ``--set`` overrides, and validation errors as one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from autorank.config.experiment import ExperimentConfig


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one line for the user."""


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a 100,000-character name stays one line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown setting (check the spelling; see configs/default.yaml)"
    if msg.startswith(f"{where}."):  # a section's own check names its setting already
        return msg
    if (
        "input" in first
        and first["type"] not in ("missing",)
        and not isinstance(first["input"], dict)
    ):
        return f"{where}: {msg} (got {_shown(first['input'])})"
    return f"{where}: {msg}"


def parse_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a plain mapping into an ExperimentConfig, raising ConfigError with one line."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(
            f"override {assignment!r}: expected key=value, e.g. partition.n_clients=20"
        )
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {_shown(assignment)}: value is not valid YAML") from None
    except RecursionError:
        raise ConfigError(f"override {_shown(assignment)}: {_TOO_DEEP}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (it would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"line {key_node.start_mark.line + 1}: key {key!r} is given twice "
                    "(expected each setting once)"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# A value nested thousands deep (a list of lists ...) exhausts the YAML loader's recursion.
_TOO_DEEP = "the YAML nests too deep to read; expected settings a few levels deep"


def _yaml_text(path: Path) -> str:
    """The text of a config file, refusing what is no readable UTF-8 file in one line."""
    where = f"config file {str(path)!r}"
    if path.is_dir():
        raise ConfigError(f"{where} is a folder; expected a YAML file")
    if not path.exists():
        raise ConfigError(f"{where} not found; expected a YAML file")
    if not path.is_file():  # /dev/null, a pipe: nothing a run could read again on resume
        raise ConfigError(f"{where} is not a regular file; expected a YAML file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{where} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
            f"{err.start}); expected a YAML file"
        ) from None
    except OSError as err:
        raise ConfigError(f"{where} could not be read ({err.strerror})") from None


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping from a file, raising ConfigError for a missing or malformed file."""
    text = _yaml_text(path)
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except ConfigError as err:
        raise ConfigError(f"config file {str(path)!r}, {err}") from None
    except RecursionError:
        raise ConfigError(f"config file {str(path)!r}: {_TOO_DEEP}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping, got {type(raw).__name__}"
        )
    return raw


def load_config(
    path: Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Load a YAML config (or the defaults), apply ``key=value`` overrides, and validate."""
    raw = read_yaml(path) if path is not None else {}
    for assignment in overrides:
        apply_override(raw, assignment)
    return parse_config(raw)
