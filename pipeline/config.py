"""Typed access to one section of ``params.yaml``.

Each stage declares a pydantic model for its own section and loads only that section, so a
typo in ``params.yaml`` (unknown key, wrong type, out-of-range value) fails the stage at start
with a message that names the section and the field.
"""
from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

DEFAULT_PARAMS = Path("params.yaml")


class Section(BaseModel):
    """Base for a params section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


S = TypeVar("S", bound=BaseModel)


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
        return model.model_validate(document[name] or {})
    except ValidationError as err:
        problems = "; ".join(
            f"{name}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            + (f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e["input"], dict) else "")
            for e in err.errors()
        )
        raise ParamsError(f"{path}: {problems}") from err
