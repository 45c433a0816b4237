"""End to end: register a model in MLflow, package it (BentoML store + Bento), serve it on
loopback and score real recordings over HTTP, with the pipeline's own functions as the oracle."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.torch import save_file

from pipeline import audio
from pipeline.models.inference import ExportedModel
from pipeline.contracts import FeatureMeta, FeaturesFolder, ModelFolder, ModelInfo
from pipeline.features import FeatureParams, log_mel_batch
from pipeline.stages.register import RegisterParams
from pipeline.stages.register import run as register_run
from pipeline.models.networks import ModelParams, build_network, make_spec
from tests.conftest import REPO, subprocess_env
from tests.integration.conftest import packaged_and_served

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 180.0


def _model_folder(folder: Path, features: FeatureParams | None = None) -> Path:
    """A CNN with random weights, exported as the train stage does (model.json + safetensors), for
    the repo's feature parameters or ``features``."""
    import torch

    torch.manual_seed(0)
    feats = yaml.safe_load((REPO / "params.yaml").read_text())["featurize"]["features"]
    fp = features or FeatureParams.model_validate(feats)
    spec = make_spec(ModelParams(), fp.n_mels, fp.frames, "classifier", num_outputs=1)
    network = build_network(spec).eval()
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(folder / "model.safetensors"))
    ModelFolder(folder).write_info(ModelInfo(spec=spec, classes=["bad", "good"], binary=True, positive_class="good",
                                             features=fp, label_column="quality", fold="fold_0"))
    return folder


def _write_profile(model_dir: Path, training: list[Path]) -> None:
    """The drift profile of ``training`` recordings, as the train stage writes it."""
    from pipeline import profile
    from pipeline.io import write_json
    from pipeline.stages.validate_raw import describe

    model = ExportedModel.load(model_dir)
    files = pd.DataFrame([describe(p, p.name) for p in training])
    feats = log_mel_batch([audio.load(p, model.info.features.sample_rate) for p in training], model.info.features)[0]
    write_json(ModelFolder(model_dir).profile_path, profile.build(files, feats, np.arange(len(feats))).model_dump())


def _wav(samples: np.ndarray, sr: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    audio.write_wav(buf, samples, sr, subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("serving")
    env = {**subprocess_env(), "BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "SOUNDLINE_PARAMS": str(REPO / "params.yaml")}
    recordings = sorted((shared_data / "fsdd" / "recordings").glob("*.wav"))[:6]
    model_dir = _model_folder(root / "model")
    _write_profile(model_dir, sorted((shared_data / "fsdd" / "recordings").glob("*.wav"))[::25])
    # Register it exactly as the register stage does (first version: takes @champion).
    features = root / "features"
    features.mkdir()
    fp = ExportedModel.load(model_dir).info.features
    np.save(features / "features.npy", np.zeros((2, fp.n_mels, fp.frames), np.float32))
    FeaturesFolder(features).write(pd.DataFrame(), FeatureMeta(features=fp, label_column="quality",
                                                               shape=(2, fp.n_mels, fp.frames), classes=["bad", "good"]))
    (root / "predictions.csv").write_text("path,label,predicted,correct,kept,baseline_predicted,baseline_correct\n"
                                          + "".join(f"{p.name},good,good,True,True,good,True\n" for p in recordings))
    (root / "train.json").write_text("{}")
    (root / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef.dir\n  path: data/raw\n")
    mp = pytest.MonkeyPatch()
    for key in ("MLFLOW_TRACKING_URI", "BENTOML_HOME"):
        mp.setenv(key, env[key])
    mp.chdir(root)
    try:
        record = register_run(model_dir, root / "predictions.csv", root / "train.json", features,
                              root / "data.dvc", REPO / "params.yaml", RegisterParams(),
                              root / "register.json", root / "audit.jsonl")
    finally:
        mp.undo()
    assert record["move"] and record["holder_after"] == "1"
    with packaged_and_served(root, features, REPO / "params.yaml", env, START_TIMEOUT_S) as (url, package, log):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield {"client": client, "package": package, "model": ExportedModel.load(model_dir),
                   "recordings": recordings, "root": root, "log": log}


def _post(served: dict, data: bytes, endpoint: str = "classify", name: str = "clip.wav",
          raw: bool = False) -> httpx.Response:
    """A multipart upload to /<endpoint>, or (raw) the file as the body of /raw/<endpoint>."""
    if raw:
        return served["client"].post(f"/raw/{endpoint}", params={"name": name}, content=data,
                                     headers={"content-type": "audio/wav"})
    return served["client"].post(f"/{endpoint}", files={"audio": (name, data, "audio/wav")})


def _assert_ok(resp: httpx.Response, served: dict) -> dict:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["model"], body["version"], body["alias"]) == (served["package"]["mlflow_model"], "1", "champion")
    return body


def test_package_record_names_the_registered_version(served: dict) -> None:
    package = served["package"]
    assert package["mlflow_version"] == "1" and package["alias"] == "champion"
    assert package["mlflow_model"].startswith("soundline-quality-")  # one registered model per task
    assert Path(package["bento_file"]).stat().st_size > 0
    assert package["bento_tag"].startswith("soundline:") and package["bento_model_tag"].startswith("soundline:")


def test_health_readiness_and_metrics(served: dict) -> None:
    client = served["client"]
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "bentoml_service_request" in metrics.text


def test_classify_matches_the_pipeline_features_and_evaluation(served: dict) -> None:
    model: ExportedModel = served["model"]
    params = model.info.features
    for path in served["recordings"][:3]:
        expected, _ = log_mel_batch([audio.load(path, params.sample_rate, name=path.name)], params)
        feats = _assert_ok(_post(served, path.read_bytes(), "features", path.name), served)
        np.testing.assert_allclose(np.asarray(feats["features"], np.float32), expected[0], atol=1e-6, rtol=0)
        probs = model.class_probabilities(expected, np.arange(1))[0]
        body = _assert_ok(_post(served, path.read_bytes(), name=path.name), served)
        np.testing.assert_allclose([body["probabilities"][c] for c in model.classes], probs, atol=1e-5, rtol=0)
        assert body["label"] == model.classes[int(np.argmax(probs))]


def test_raw_body_route_answers_as_the_multipart_one(served: dict) -> None:
    for path in served["recordings"][:3]:
        form = _assert_ok(_post(served, path.read_bytes(), name=path.name), served)
        raw = _assert_ok(_post(served, path.read_bytes(), name=path.name, raw=True), served)
        assert raw["file"] == path.name and raw["label"] == form["label"]
        np.testing.assert_allclose(list(raw["probabilities"].values()), list(form["probabilities"].values()),
                                   atol=1e-6, rtol=0)
    unnamed = served["client"].post("/raw/classify", content=served["recordings"][0].read_bytes())
    assert _assert_ok(unnamed, served)["file"] == "upload"
    assert 'endpoint="/raw/classify"' in served["client"].get("/metrics").text  # BentoML's request metrics


def test_raw_chunked_upload_over_the_limit_is_a_413(served: dict) -> None:
    chunks = (b"\0" * 2**20 for _ in range(11))  # no Content-Length: counted while it arrives
    resp = served["client"].post("/raw/classify", content=chunks)
    assert resp.status_code == 413 and "exceeds the limit" in resp.json()["error"]


def test_batch_embed_and_group_verdict(served: dict) -> None:
    client, paths = served["client"], served["recordings"][:3]
    files = [("audios", (p.name, p.read_bytes(), "audio/wav")) for p in paths]
    batch = client.post("/classify_batch", files=files)
    assert batch.status_code == 200 and [p["file"] for p in batch.json()["predictions"]] == [p.name for p in paths]
    emb = _assert_ok(_post(served, paths[0].read_bytes(), "embed"), served)
    assert emb["dim"] == len(emb["embedding"]) > 0
    verdict = _assert_ok(client.post("/group_verdict", files=files, data={"group": "speaker"}), served)
    assert verdict["group"] == "speaker" and len(verdict["files"]) == 3
    labels = [f["label"] for f in verdict["files"]]
    assert verdict["label"] in labels and verdict["n_files"] == 3


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT"])
def test_bit_depths_are_accepted(served: dict, subtype: str) -> None:
    wave = 0.3 * np.sin(np.linspace(0, 2000, 8000)).astype(np.float32)
    _assert_ok(_post(served, _wav(wave, 8000, subtype)), served)


def test_96k_stereo_24bit_is_resampled_and_downmixed(served: dict) -> None:
    rng = np.random.default_rng(0)
    stereo = (0.1 * rng.standard_normal((96000, 2))).astype(np.float32)
    _assert_ok(_post(served, _wav(stereo, 96000, "PCM_24")), served)


def _nan_wav() -> bytes:
    wave = np.zeros(8000, np.float32)
    wave[100] = np.nan
    return _wav(wave, 8000, "FLOAT")


BAD = {  # name: (payload, status, words in the message)
    "empty body": (lambda: b"", 422, "empty file"),
    "non-audio bytes": (lambda: b"this is not audio at all" * 40, 422, "not a decodable audio file"),
    "truncated wav": (lambda: _wav(np.zeros(16000, np.float32), 16000)[:5000], 422, "truncated WAV"),
    "nan samples": (_nan_wav, 422, "non-finite"),
    "too long (60 s, under the upload limit)": (lambda: _wav(np.zeros(60 * 8000, np.float32), 8000, "PCM_U8"),
                                                422, "too long"),
    "1 hour at 8 kHz 8-bit (29 MB: over the upload limit)": (
        lambda: _wav(np.zeros(3600 * 8000, np.float32), 8000, "PCM_U8"), 413, "exceeds the limit"),
}


@pytest.mark.parametrize("raw", [False, True], ids=["multipart", "raw-body"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_rejected_with_its_problem_and_service_survives(served: dict, case: str, raw: bool) -> None:
    make, status, words = BAD[case]
    resp = _post(served, make(), name="upload.wav", raw=raw)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"] and words in resp.json()["problem"]
    if status == 422:  # the message names the client's file, not the server's temporary copy
        assert resp.json()["file"] == "upload.wav" and resp.json()["error"].startswith("upload.wav: ")
    _assert_ok(_post(served, served["recordings"][0].read_bytes()), served)


@pytest.mark.parametrize(("route", "field"), [("/enhance", "audio"), ("/enhance_batch", "audios"),
                                             ("/raw/enhance", None)])
def test_enhance_routes_of_a_classifier_are_409s_naming_the_task(served: dict, route: str, field: str | None) -> None:
    data = served["recordings"][0].read_bytes()
    client = served["client"]
    resp = client.post(route, content=data) if field is None else client.post(route, files={field: ("a.wav", data)})
    assert resp.status_code == 409, resp.text
    assert "task classify, not enhance" in resp.json()["error"] and "/classify" in resp.json()["error"]


def test_missing_field_is_a_400_not_a_500(served: dict) -> None:
    resp = served["client"].post("/classify", content=b"", headers={"content-type": "multipart/form-data; boundary=x"})
    assert resp.status_code == 400


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_concurrent_requests_are_batched(served: dict) -> None:
    import asyncio

    data = served["recordings"][0].read_bytes()

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=str(served["client"].base_url), timeout=60) as client:
            rs = await asyncio.gather(*(client.post("/classify", files={"audio": ("a.wav", data)}) for _ in range(48)))
        return [r.status_code for r in rs]

    before = served["client"].get("/metrics").text
    assert asyncio.run(burst()) == [200] * 48
    after = served["client"].get("/metrics").text
    calls = _metric(after, "soundline_model_batch_size_count") - _metric(before, "soundline_model_batch_size_count")
    clips = _metric(after, "soundline_model_batch_size_sum") - _metric(before, "soundline_model_batch_size_sum")
    assert clips == 48, after[:2000]
    assert calls < 48  # some model calls served several requests at once


# --- hostile requests: every client mistake is a 4xx naming it, and the service stays up -------------

def _fmt_changed(data: bytes, **fields: int) -> bytes:
    import struct

    pos = data.index(b"fmt ") + 8
    names = ("tag", "channels", "rate", "byte_rate", "align", "bits")
    values = dict(zip(names, struct.unpack("<HHIIHH", data[pos:pos + 16])))
    values.update(fields)
    return data[:pos] + struct.pack("<HHIIHH", *(values[n] for n in names)) + data[pos + 16:]


def test_form_field_of_another_name_is_a_400_naming_it(served: dict) -> None:
    data = served["recordings"][0].read_bytes()
    resp = served["client"].post("/classify", files={"sound": ("a.wav", data, "audio/wav")})
    assert resp.status_code == 400 and "unexpected form field 'sound'" in resp.json()["error"]
    assert "audio" in resp.json()["error"]
    _assert_ok(_post(served, data), served)


def test_overlong_file_name_and_part_headers_are_400s(served: dict) -> None:
    data = served["recordings"][0].read_bytes()
    resp = served["client"].post("/classify", files={"audio": ("x" * 3000 + ".wav", data, "audio/wav")})
    assert resp.status_code == 400 and "file name of 3004 characters exceeds the limit of 255" in resp.json()["error"]
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"a.wav\"\r\n"
            f"X-Padding: {'y' * 20000}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    resp = served["client"].post("/classify", content=body,
                                 headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert resp.status_code == 400 and "malformed multipart body" in resp.json()["error"]
    _assert_ok(_post(served, data), served)


@pytest.mark.parametrize(("fields", "words"), [
    ({"bits": 12, "align": 1}, "12 bits per sample"),
    ({"byte_rate": 7}, "byte rate 7"),
    ({"tag": 0x0055}, "unsupported WAV codec"),
])
@pytest.mark.parametrize("raw", [False, True], ids=["multipart", "raw-body"])
def test_inconsistent_wav_headers_are_422s(served: dict, fields: dict, words: str, raw: bool) -> None:
    resp = _post(served, _fmt_changed(_wav(0.1 * np.ones(8000, np.float32), 8000), **fields), name="odd.wav", raw=raw)
    assert resp.status_code == 422, resp.text
    assert words in resp.json()["problem"] and resp.json()["file"] == "odd.wav"


def test_fuzzed_wav_headers_and_multipart_bodies_never_get_a_5xx(served: dict) -> None:
    """Property: whatever the header fields and the form look like, the answer is no 5xx, and the
    service stays ready."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    client, clean = served["client"], _wav(0.1 * np.sin(np.arange(4000, dtype=np.float32)), 8000)
    u16, u32 = st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1)

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(tag=st.sampled_from([0, 1, 3, 6, 7, 0x55, 0xFFFE]) | u16, channels=st.integers(0, 9) | u16,
           rate=st.sampled_from([0, 1, 8000, 44100]) | u32, byte_rate=u32, align=st.integers(0, 16) | u16,
           bits=st.sampled_from([0, 8, 12, 16, 24, 32, 64]) | u16, cut=st.integers(0, len(clean)),
           field=st.sampled_from(["audio", "audios", "sound", "", "audio\"x"]),
           filename=st.text(min_size=0, max_size=400), raw=st.booleans())
    def check(tag, channels, rate, byte_rate, align, bits, cut, field, filename, raw):
        data = _fmt_changed(clean, tag=tag, channels=channels, rate=rate, byte_rate=byte_rate, align=align,
                            bits=bits)[:cut]
        if raw:
            resp = client.post("/raw/classify", params={"name": filename}, content=data)
        else:
            resp = client.post("/classify", files={field: (filename, data, "audio/wav")})
        assert resp.status_code < 500, (resp.status_code, resp.text[:300])

    check()
    assert client.get("/readyz").status_code == 200
    _assert_ok(_post(served, served["recordings"][0].read_bytes()), served)


# --- the drift guard and command-line prediction ------------------------------------------------------

def test_every_answer_says_whether_the_input_looks_like_the_training_data(served: dict) -> None:
    from tests.integration.test_drift import heart_like

    ok = _assert_ok(_post(served, served["recordings"][0].read_bytes()), served)
    assert ok["in_distribution"] is True and ok["drift"] == []
    heart = _assert_ok(_post(served, heart_like(), name="heart.wav"), served)  # warn: labelled, and flagged
    assert heart["in_distribution"] is False and "sample_rate" in heart["drift"]
    raw = _assert_ok(_post(served, heart_like(), name="heart.wav", raw=True), served)
    assert raw["drift"] == heart["drift"]
    metrics = served["client"].get("/metrics").text
    assert _metric(metrics, 'soundline_drift_failures_total{check="sample_rate"}') >= 2
    assert _metric(metrics, 'soundline_drift_inputs_total{in_distribution="false"}') >= 2


def test_predict_cli_answers_as_the_service(served: dict, tmp_path: Path) -> None:
    from tests.integration.test_drift import heart_like

    (tmp_path / "in").mkdir()
    for path in served["recordings"][:3]:
        (tmp_path / "in" / path.name).write_bytes(path.read_bytes())
    (tmp_path / "in" / "heart.wav").write_bytes(heart_like())
    (tmp_path / "in" / "broken.wav").write_bytes(b"RIFF....WAVEjunk")
    out = tmp_path / "predictions.json"
    env = {**subprocess_env(), "BENTOML_HOME": str(served["root"] / "bentoml")}
    proc = subprocess.run([sys.executable, "-m", "pipeline.predict", str(tmp_path / "in"), "--model",
                           served["package"]["bento_tag"], "--out", str(out), "--mc-dropout", "5"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "broken.wav" in proc.stderr  # the undecodable file is named, not fatal
    result = json.loads(out.read_text())
    by_file = {Path(r["file"]).name: r for r in result["predictions"]}
    assert set(by_file) == {p.name for p in served["recordings"][:3]} | {"heart.wav"}
    assert list(result["errors"]) == [str(tmp_path / "in" / "broken.wav")]
    for name, row in by_file.items():
        data = (tmp_path / "in" / name).read_bytes()
        body = _assert_ok(_post(served, data, name=name), served)
        assert row["label"] == body["label"] and row["in_distribution"] == body["in_distribution"]
        assert row["drift"] == ",".join(body["drift"])
        np.testing.assert_allclose([row[f"prob_{c}"] for c in body["probabilities"]],
                                   list(body["probabilities"].values()), atol=1e-5)
        assert 0 <= row["prob_mc_low"] <= row["prob_mc_high"] <= 1
