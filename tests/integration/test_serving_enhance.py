"""End to end for task enhance: register a speech enhancer in MLflow (params task: enhance), package
it, serve it on loopback and enhance recordings over HTTP, with ``ExportedEnhancer.enhance`` (the
call the evaluate stage scores) as the oracle. The network is a random-init MaskUNet: the point is
the plumbing, not the enhancement."""
from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml

from pipeline import audio
from pipeline.contracts import EnhanceMeta, EnhancerInfo
from pipeline.io import write_json
from pipeline.models.enhancer import ExportedEnhancer, export_enhancer
from pipeline.models.networks import UNetParams, build_network, make_unet_spec
from pipeline.stages.register import RegisterParams
from pipeline.stages.register import run as register_run
from tests.conftest import REPO, subprocess_env
from tests.integration.conftest import packaged_and_served

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 180.0
LSB = 1 / 32768  # one step of a 16-bit sample


def _wav(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    audio.write_wav(buf, samples, rate, subtype=subtype)
    return buf.getvalue()


def _noisy(rate: int, seconds: float = 1.0, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A tone in white noise, peak about 0.4 (well inside full scale)."""
    t = np.arange(int(rate * seconds)) / rate
    noise = np.random.default_rng(seed).standard_normal((len(t), channels))
    return (0.25 * np.sin(2 * np.pi * 440 * t)[:, None] + 0.04 * noise).squeeze().astype(np.float32)


def _register(root: Path, params: Path, p: RegisterParams, env: dict[str, str]) -> dict:
    """The register stage's run, in ``root`` with its MLflow store."""
    mp = pytest.MonkeyPatch()
    for key in ("MLFLOW_TRACKING_URI", "BENTOML_HOME"):
        mp.setenv(key, env[key])
    mp.chdir(root)
    try:
        return register_run(root / "model", root / "predictions.csv", root / "train.json", root / "features",
                            root / "data.dvc", params, p, root / "register.json", root / "audit.jsonl")
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    import torch

    root = tmp_path_factory.mktemp("serving_enhance")
    env = {**subprocess_env(), "BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "SOUNDLINE_PARAMS": str(root / "params.yaml")}
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["task"] = "enhance"
    params["serve"]["workers"] = 1  # one model copy: a quicker start on the 2-core test machine
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    torch.manual_seed(0)
    spec = make_unet_spec(UNetParams(channels=4, depth=2))
    export_enhancer(root / "model", build_network(spec).eval(), EnhancerInfo(spec=spec, sample_rate=16000, fold="fold_0"))
    (root / "features").mkdir()
    write_json(root / "features" / "meta.json", EnhanceMeta(sample_rate=16000, pairs=12).model_dump(mode="json"))
    ref = np.linspace(0.0, 6.0, 12)  # the evaluate stage's predictions: the model beats spectral gating
    pd.DataFrame({"path": [f"noisy/u{i:02d}.wav" for i in range(12)], "pair": [f"u{i:02d}" for i in range(12)],
                  "si_snr": ref + 1.0 + 0.1 * np.arange(12), "ref_si_snr": ref}).to_csv(root / "predictions.csv",
                                                                                      index=False)
    (root / "train.json").write_text("{}")
    (root / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef.dir\n  path: data/raw\n")
    record = _register(root, root / "params.yaml", RegisterParams(), env)
    assert record["move"] and record["holder_after"] == "1", record
    with packaged_and_served(root, root / "features", root / "params.yaml", env, START_TIMEOUT_S) as (url, package, _):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield {"client": client, "package": package, "record": record, "root": root, "env": env,
                   "enhancer": ExportedEnhancer.load(root / "model")}


def _post(served: dict, data: bytes, endpoint: str = "enhance", name: str = "noisy.wav",
          raw: bool = False, field: str = "audio") -> httpx.Response:
    if raw:
        return served["client"].post(f"/raw/{endpoint}", params={"name": name}, content=data,
                                     headers={"content-type": "audio/wav"})
    return served["client"].post(f"/{endpoint}", files={field: (name, data, "audio/wav")})


def _expected(served: dict, data: bytes, rate: int) -> np.ndarray:
    """What evaluate's call gives for the file at its own rate (the service sends it as PCM_16)."""
    return np.clip(served["enhancer"].enhance(audio.load(data, rate), rate), -1, 1)


def _assert_wav(resp: httpx.Response, served: dict) -> tuple[np.ndarray, sf._SoundFileInfo]:
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "audio/wav"
    package = served["package"]
    assert resp.headers["x-soundline-model"] == package["mlflow_model"]
    assert (resp.headers["x-soundline-version"], resp.headers["x-soundline-alias"]) == ("1", "champion")
    assert resp.headers["x-soundline-bento-model"] == package["bento_model_tag"]
    info = sf.info(io.BytesIO(resp.content))
    assert info.channels == 1 and info.subtype == "PCM_16"
    return audio.load(resp.content, info.samplerate), info


def test_registered_and_packaged_as_an_enhancer(served: dict) -> None:
    package, record = served["package"], served["record"]
    assert record["model"].startswith("soundline-enhance-") and record["task"] == "enhance"
    assert record["baseline"]["test"] == "wilcoxon" and record["baseline"]["passed"] is True
    assert package["mlflow_model"] == record["model"] and package["mlflow_version"] == "1"
    name, version = package["bento_model_tag"].split(":")
    stored = yaml.safe_load((served["root"] / "bentoml" / "models" / name / version / "model.yaml").read_text())
    assert stored["metadata"]["task"] == "enhance" and stored["metadata"]["sample_rate"] == 16000


@pytest.mark.parametrize(("rate", "channels", "subtype"), [(16000, 1, "PCM_16"), (8000, 1, "PCM_16"),
                                                          (44100, 2, "PCM_24")])
def test_enhance_round_trip_equals_the_evaluate_call(served: dict, rate: int, channels: int, subtype: str) -> None:
    data = _wav(_noisy(rate, channels=channels), rate, subtype)
    got, info = _assert_wav(_post(served, data, name="take 1.wav"), served)
    assert info.samplerate == rate and info.frames == rate  # one second in, one second out
    assert "take%201_enhanced.wav" in _post(served, data, name="take 1.wav").headers["content-disposition"]
    np.testing.assert_allclose(got, _expected(served, data, rate), atol=LSB + 1e-7, rtol=0)


def test_raw_body_and_batch_routes_answer_as_enhance(served: dict) -> None:
    files = {"a.wav": _wav(_noisy(16000, seed=1), 16000), "b.wav": _wav(_noisy(8000, 0.5, seed=2), 8000)}
    raw, info = _assert_wav(_post(served, files["b.wav"], name="b.wav", raw=True), served)
    assert info.samplerate == 8000 and info.frames == 4000
    np.testing.assert_allclose(raw, _expected(served, files["b.wav"], 8000), atol=LSB + 1e-7, rtol=0)
    resp = served["client"].post("/enhance_batch", files=[("audios", (n, d, "audio/wav")) for n, d in files.items()])
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["model"], body["version"], body["alias"]) == (served["package"]["mlflow_model"], "1", "champion")
    assert [(f["file"], f["sample_rate"]) for f in body["files"]] == [("a.wav", 16000), ("b.wav", 8000)]
    for item, data in zip(body["files"], files.values()):
        wav = base64.b64decode(item["wav_base64"])
        np.testing.assert_allclose(audio.load(wav, item["sample_rate"]), _expected(served, data, item["sample_rate"]),
                                   atol=LSB + 1e-7, rtol=0)


BAD = {  # name: (payload, status, words in the message)
    "empty body": (lambda: b"", 422, "empty file"),
    "garbage bytes": (lambda: b"this is not audio at all" * 40, 422, "not a decodable audio file"),
    "truncated wav": (lambda: _wav(_noisy(16000), 16000)[:5000], 422, "truncated WAV"),
    "too long (60 s, under the upload limit)": (lambda: _wav(np.zeros(60 * 8000, np.float32), 8000, "PCM_U8"),
                                                422, "too long"),
    "too large (12 MB)": (lambda: _wav(np.zeros(1500 * 8000, np.float32), 8000, "PCM_U8"), 413, "exceeds the limit"),
}


@pytest.mark.parametrize("raw", [False, True], ids=["multipart", "raw-body"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_naming_the_problem(served: dict, case: str, raw: bool) -> None:
    make, status, words = BAD[case]
    resp = _post(served, make(), name="upload.wav", raw=raw)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]
    if status == 422:
        assert resp.json()["file"] == "upload.wav"


def test_wrong_field_and_a_bad_file_in_a_batch(served: dict) -> None:
    resp = _post(served, _wav(_noisy(16000), 16000), field="sound")
    assert resp.status_code == 400 and "unexpected form field 'sound'" in resp.json()["error"]
    assert "audio" in resp.json()["error"]
    good, bad = _wav(_noisy(8000), 8000), b"RIFF....WAVEjunk"
    resp = served["client"].post("/enhance_batch", files=[("audios", ("ok.wav", good)), ("audios", ("bad.wav", bad))])
    assert resp.status_code == 422 and resp.json()["file"] == "bad.wav"
    _assert_wav(_post(served, good), served)  # still serving


@pytest.mark.parametrize("route", ["/classify", "/classify_batch", "/features", "/embed", "/group_verdict"])
def test_classify_routes_of_an_enhancer_are_409s_naming_the_task(served: dict, route: str) -> None:
    field = "audios" if route in ("/classify_batch", "/group_verdict") else "audio"
    resp = served["client"].post(route, files={field: ("a.wav", _wav(_noisy(8000), 8000))})
    assert resp.status_code == 409, resp.text
    assert "task enhance, not classify" in resp.json()["error"] and "/enhance" in resp.json()["error"]


def test_raw_classify_of_an_enhancer_is_a_409(served: dict) -> None:
    resp = _post(served, _wav(_noisy(8000), 8000), endpoint="classify", raw=True)
    assert resp.status_code == 409 and "task enhance" in resp.json()["error"]


def test_fuzzed_wav_headers_never_get_a_5xx(served: dict) -> None:
    """Whatever the fmt chunk says (odd rates included: the output is written at the input's rate),
    the answer is no 5xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from tests.integration.test_serving import _fmt_changed

    clean = _wav(0.1 * np.sin(np.arange(4000, dtype=np.float32)), 8000)

    @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(tag=st.sampled_from([1, 3, 0xFFFE]) | st.integers(0, 2**16 - 1), channels=st.integers(0, 3),
           rate=st.sampled_from([0, 1, 7, 8000, 192000, 2**31 - 1, 2**32 - 1]), bits=st.sampled_from([8, 16, 24, 32]),
           cut=st.integers(0, len(clean)), raw=st.booleans())
    def check(tag: int, channels: int, rate: int, bits: int, cut: int, raw: bool) -> None:
        align = channels * ((bits + 7) // 8)
        data = _fmt_changed(clean, tag=tag, channels=channels, rate=rate, byte_rate=(rate * align) % 2**32,
                            align=align, bits=bits)[:cut]
        resp = _post(served, data, raw=raw)
        assert resp.status_code < 500, (resp.status_code, resp.text[:300])

    check()
    assert served["client"].get("/readyz").status_code == 200


def test_a_second_enhancer_equal_to_the_champion_is_registered_but_kept_out(served: dict) -> None:
    """The champion gate through the registry: the champion's predictions.csv is downloaded and
    compared per utterance; an equal challenger does not move the alias."""
    root = served["root"]
    record = _register(root, root / "params.yaml", RegisterParams(), served["env"])
    assert record["challenger_version"] == "2" and record["holder_after"] == "1"
    assert record["move"] is False and record["p_value"] == 1.0 and record["test"] == "wilcoxon"
    assert record["why"].startswith("not better enough")
