"""pipeline.config: load_section errors name the section and key; the repo's params.yaml validates."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

import pipeline
from pipeline.config import ParamsError, Section, load_section
from pipeline.featurize import FeaturizeParams
from pipeline.features import FeatureParams
from pipeline.validate_features import FeatureChecks
from pipeline.validate_raw import RawParams

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"

# params.yaml section -> the model of the stage that reads it (dvc.yaml `params:`).
STAGE_MODELS: dict[str, type[BaseModel]] = {
    "validate_raw": RawParams,
    "featurize": FeaturizeParams,
    "validate_features": FeatureChecks,
}


class Demo(Section):
    rate: int = 16000
    name: str = "x"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"params file not found"):
        load_section("demo", Demo, tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_section("demo", Demo, write(tmp_path, "demo: [unclosed\n"))


def test_missing_section(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"section 'demo' is missing"):
        load_section("demo", Demo, write(tmp_path, "other:\n  rate: 1\n"))


def test_unknown_key_names_section_and_key(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"demo\.rat: Extra inputs are not permitted"):
        load_section("demo", Demo, write(tmp_path, "demo:\n  rat: 8000\n"))


def test_bad_type_names_section_and_key(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"demo\.rate: Input should be a valid integer"):
        load_section("demo", Demo, write(tmp_path, "demo:\n  rate: fast\n"))


def test_nested_error_names_the_full_path(tmp_path: Path, params_file) -> None:
    path = params_file({"featurize": {"features": {"n_mels": "many"}}})
    with pytest.raises(ParamsError, match=r"featurize\.features\.n_mels: Input should be a valid integer") as err:
        load_section("featurize", FeaturizeParams, path)
    assert str(path) in str(err.value)


def test_empty_section_gives_defaults(tmp_path: Path) -> None:
    assert load_section("demo", Demo, write(tmp_path, "demo:\n")) == Demo()


def test_sections_are_frozen(tmp_path: Path) -> None:
    section = load_section("demo", Demo, write(tmp_path, "demo:\n  rate: 8000\n"))
    assert section.rate == 8000
    with pytest.raises(ValueError):
        section.rate = 1  # type: ignore[misc]


@pytest.mark.parametrize("section", sorted(STAGE_MODELS))
def test_repo_params_section_validates(section: str) -> None:
    model = STAGE_MODELS[section]
    loaded = load_section(section, model, REPO_PARAMS)
    raw = yaml.safe_load(REPO_PARAMS.read_text())[section]
    # every key written in params.yaml is a field the model really reads (no silent defaults)
    assert set(raw) <= set(type(loaded).model_fields)


def test_repo_feature_params_are_the_featurize_features() -> None:
    loaded = load_section("featurize", FeaturizeParams, REPO_PARAMS)
    raw = yaml.safe_load(REPO_PARAMS.read_text())["featurize"]["features"]
    assert loaded.features == FeatureParams(**raw)


def _params_models() -> dict[str, type[BaseModel]]:
    """Every ``*Params`` / ``*Checks`` Section subclass defined in a pipeline module."""
    found = {}
    for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        try:
            module = importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - an optional heavy module that cannot import here
            continue
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if (obj.__module__ == module.__name__ and issubclass(obj, Section)
                    and (name.endswith("Params") or name.endswith("Checks"))):
                found[f"{module.__name__}.{name}"] = obj
    return found


def test_every_stage_model_in_use_is_checked_against_params_yaml() -> None:
    """A new stage model whose section is in params.yaml must validate it too.

    Models of nested sections (FeatureParams, SplitParams) and of stages not yet in params.yaml
    are checked where they can be: a model whose name matches a section is validated against it.
    """
    document = yaml.safe_load(REPO_PARAMS.read_text())
    models = _params_models()
    assert {"pipeline.validate_raw.RawParams", "pipeline.featurize.FeaturizeParams",
            "pipeline.validate_features.FeatureChecks"} <= set(models)
    for section, body in document.items():
        model = STAGE_MODELS.get(section)
        if model is None:
            candidates = [m for path, m in models.items() if path.split(".")[1] == section]
            if len(candidates) != 1:
                continue
            model = candidates[0]
        model.model_validate(body or {})
