"""pipeline.config: load_section errors name the section and key; the repo's params.yaml validates."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

import pipeline
from pipeline.config import ParamsError, Section, load_section
from pipeline.stages.featurize import FeaturizeParams
from pipeline.features import FeatureParams
from pipeline.stages.validate_features import FeatureChecks
from pipeline.stages.validate_raw import RawParams

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


def _stage_models() -> dict[str, tuple[str, str]]:
    """section -> (module, model name) for every ``load_section("section", Model, ...)`` call in
    pipeline/, found by reading the source (importing every stage would pull in Lightning, MLflow...)."""
    found: dict[str, tuple[str, str]] = {}
    root = Path(pipeline.__file__).parent
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        for section, model in LOAD_SECTION.findall(path.read_text()):
            found.setdefault(section, (module, model))
    return found


LOAD_SECTION = re.compile(r"""load_section\(\s*["']([A-Za-z_]\w*)["']\s*,\s*([A-Za-z_]\w*)""")
STAGE_SECTIONS = _stage_models()


def test_every_stage_reads_a_section_of_params_yaml() -> None:
    document = yaml.safe_load(REPO_PARAMS.read_text())
    assert set(STAGE_MODELS) <= set(STAGE_SECTIONS)
    for section, (module, model) in STAGE_SECTIONS.items():
        assert section in document, f"{module} reads params section '{section}' ({model}), missing in params.yaml"
        if section in STAGE_MODELS:
            assert STAGE_MODELS[section].__name__ == model


@pytest.mark.slow  # imports the later stages (Lightning, MLflow, BentoML)
@pytest.mark.parametrize("section", sorted(set(STAGE_SECTIONS) - set(STAGE_MODELS)))
def test_later_stage_sections_validate(section: str) -> None:
    module_name, model_name = STAGE_SECTIONS[section]
    module = importlib.import_module(module_name)
    model = getattr(module, model_name)
    assert issubclass(model, Section)
    load_section(section, model, REPO_PARAMS)  # raises ParamsError naming section.key on a problem


def test_repo_serve_section_validates() -> None:
    from serving.schemas import ServeParams  # the service's section lives beside the service

    loaded = load_section("serve", ServeParams, REPO_PARAMS)
    assert set(yaml.safe_load(REPO_PARAMS.read_text())["serve"]) <= set(type(loaded).model_fields)
