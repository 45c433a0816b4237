"""Typed access to one section of ``params.yaml``.

Each stage declares a pydantic model for its own section and loads only that section, so a
typo in ``params.yaml`` (unknown key, wrong type, out-of-range value) fails the stage at start
with a message that names the section and the field.

One seed: the top-level ``seed`` fills every ``seed`` field a section (or a model nested in it)
declares and leaves unset, so one number feeds every stage's randomness; a section's own
``seed`` overrides it for that section and what it holds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

DEFAULT_PARAMS = Path("params.yaml")
TASKS = ("classify", "enhance")
Task = Literal["classify", "enhance"]


class Section(BaseModel):
    """Base for a params section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


S = TypeVar("S", bound=BaseModel)


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def inherit_seed(model: type[BaseModel], data: Any, seed: Any) -> Any:
    """``data`` with ``seed`` set wherever ``model`` (or a model nested in it) has a ``seed`` field
    that ``data`` leaves out; an explicit ``seed`` is inherited below it instead."""
    if seed is None or not isinstance(data, dict):
        return data
    out = dict(data)
    if "seed" in model.model_fields:
        out.setdefault("seed", seed)
    for name, field in model.model_fields.items():
        sub = _nested_model(field.annotation)
        if sub is None or (name not in out and "seed" not in sub.model_fields):
            continue
        out[name] = inherit_seed(sub, out.get(name, {}), out.get("seed", seed))
    return out


class ParamsError(ValueError):
    """A params section is missing or invalid."""


def load_section(name: str, model: type[S], path: Path | str = DEFAULT_PARAMS) -> S:
    """Read section ``name`` of the YAML file at ``path`` and validate it with ``model``."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as err:
        raise ParamsError(f"{path}: params file not found") from err
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    if name not in document:
        raise ParamsError(f"{path}: section '{name}' is missing")
    try:
        return model.model_validate(inherit_seed(model, document[name] or {}, document.get("seed")))
    except ValidationError as err:
        problems = "; ".join(
            f"{name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            + (f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else "")
            for e in err.errors()
        )
        raise ParamsError(f"{path}: {problems}") from err


def load_task(path: Path | str = DEFAULT_PARAMS) -> Task:
    """The top-level ``task`` of the params file: ``classify`` (labelled clips) or ``enhance``
    (paired noisy/clean recordings); ``classify`` when the key is absent."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as err:
        raise ParamsError(f"{path}: params file not found") from err
    task = document.get("task", "classify")
    if task not in TASKS:
        raise ParamsError(f"{path}: task: must be one of {list(TASKS)}, got {task!r}")
    return task
