"""The settings reference: every field of a config model with its type, default and meaning.

Generated from the pydantic models themselves (``autorank config --schema`` prints it), so it
lists exactly what is validated. Types and defaults are written as they are given in YAML or with
``--set`` (``null``, ``[200, 200]``); bounds come from the fields' constraints.
"""

from __future__ import annotations

import textwrap
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Annotated, Any, Literal, TypeGuard, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

WIDTH = 100


@dataclass(frozen=True)
class Setting:
    """One field of a config model.

    Attributes:
        name: the dotted name ``--set`` takes (``lora.r_max``); a mapping's key is ``<key>``.
        type: the accepted values in short (``int >= 1``, ``fixed | proportional | rslora``).
        default: the default as YAML writes it; None when the field is required.
        description: what the field does.
    """

    name: str
    type: str
    default: str | None
    description: str


def settings_of(model: type[BaseModel], prefix: str = "") -> list[Setting]:
    """Every field of ``model`` and of the models nested in it, in declaration order.

    A section (a field holding one model) is no row of its own: its fields are. A mapping of
    models (``lora.layer_ranges``) is a row, followed by its values' fields under ``<key>``.
    """
    rows: list[Setting] = []
    for name, field in model.model_fields.items():
        dotted = prefix + name
        if _is_model(field.annotation):
            rows += settings_of(field.annotation, dotted + ".")
            continue
        rows.append(
            Setting(
                dotted, type_name(field.annotation, field.metadata), _default(field), _text(field)
            )
        )
        if get_origin(field.annotation) is dict and _is_model(get_args(field.annotation)[1]):
            rows += settings_of(get_args(field.annotation)[1], dotted + ".<key>.")
    return rows


def _is_model(annotation: Any) -> TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _text(field: FieldInfo) -> str:
    return " ".join((field.description or "").split())


def type_name(annotation: Any, metadata: Sequence[Any] = ()) -> str:
    """A type as YAML gives it, with the bounds in ``metadata``: ``float in (0.0, 1.0)``,
    ``int >= 1 | null``."""
    bounds = _bounds(metadata)
    if not bounds:
        return _plain_type(annotation)
    args = get_args(annotation)
    if get_origin(annotation) in (Union, types.UnionType) and type(None) in args:
        kept = " | ".join(_plain_type(a) for a in args if a is not type(None))
        return f"{kept} {bounds} | null"
    return f"{_plain_type(annotation)} {bounds}"


def _plain_type(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _plain_type(args[0])
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _plain_type(a) for a in args)
    if origin is tuple:
        return f"[{_plain_type(args[0])}, ...]"
    if origin is dict:
        return f"{{{_plain_type(args[0])}: {_plain_type(args[1])}}}"
    if _is_model(annotation):
        return "{" + ", ".join(annotation.model_fields) + "}"
    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: Sequence[Any]) -> str:
    """A field's constraints in short: ``in [0.0, 1.0)``, ``>= 1``, ``non-empty``."""
    names = ("ge", "gt", "le", "lt", "min_length")
    limit = {k: getattr(m, k) for m in metadata for k in names if getattr(m, k, None) is not None}
    low = f"[{limit['ge']}" if "ge" in limit else f"({limit['gt']}" if "gt" in limit else ""
    high = f"{limit['le']}]" if "le" in limit else f"{limit['lt']})" if "lt" in limit else ""
    if low and high:
        return f"in {low}, {high}"
    for key, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if key in limit:
            return f"{sign} {limit[key]}"
    return "non-empty" if limit.get("min_length") else ""


def _default(field: FieldInfo) -> str | None:
    if field.is_required():
        return None
    return _yaml_value(field.get_default(call_default_factory=True, validated_data={}))


def _yaml_value(value: Any) -> str:
    """A value in YAML flow style: ``null``, ``true``, ``[200, 200]``, ``{}``, ``digits``."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def format_reference(model: type[BaseModel], width: int = WIDTH) -> str:
    """The settings of ``model`` as text ``width`` columns wide, grouped by section.

    Each setting starts a line, ``name (type, default D): description``, and wraps onto lines
    indented under it; each section opens with its name and its field's description.
    """
    headings = {name: _text(field) for name, field in model.model_fields.items()}
    blocks = []
    for section, rows in _grouped(settings_of(model)).items():
        lines = [f"{section}: {headings[section]}"] if section else []
        for r in rows:
            default = "required" if r.default is None else f"default {r.default}"
            entry = f"{r.name} ({r.type}, {default}): {r.description}"
            lines += textwrap.wrap(
                entry,
                width,
                initial_indent="  ",
                subsequent_indent="      ",
                break_on_hyphens=False,
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _grouped(rows: Sequence[Setting]) -> dict[str, list[Setting]]:
    """Rows by section (the first part of the name); top-level settings under ``""``."""
    groups: dict[str, list[Setting]] = {}
    for row in rows:
        section = row.name.split(".", 1)[0] if "." in row.name else ""
        groups.setdefault(section, []).append(row)
    return groups
