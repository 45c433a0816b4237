"""End to end: register a model in MLflow, package it (BentoML store + Bento), serve it on
loopback and score real recordings over HTTP, with the pipeline's own functions as the oracle."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import time
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
from tests.integration.conftest import _free_port, _stop

pytestmark = pytest.mark.slow
START_TIMEOUT_S = 180.0


def _model_folder(folder: Path) -> Path:
    """A tiny CNN with random weights, exported as the train stage does (model.json + safetensors)."""
    import torch

    torch.manual_seed(0)
    feats = yaml.safe_load((REPO / "params.yaml").read_text())["featurize"]["features"]
    fp = FeatureParams.model_validate(feats)
    spec = make_spec(ModelParams(), fp.n_mels, fp.frames, "classifier", num_outputs=1)
    network = build_network(spec).eval()
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(folder / "model.safetensors"))
    ModelFolder(folder).write_info(ModelInfo(spec=spec, classes=["bad", "good"], binary=True, positive_class="good",
                                             features=fp, label_column="quality", fold="fold_0"))
    return folder


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
    subprocess.run([sys.executable, "-m", "pipeline.stages.package", "--decision", str(root / "register.json"),
                    "--features", str(features), "--bento", str(root / "soundline.bento"),
                    "--out", str(root / "package.json"), "--params", str(REPO / "params.yaml")],
                   cwd=root, env=env, check=True, timeout=600)
    package = json.loads((root / "package.json").read_text())
    port = _free_port()
    log = root / "serve.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(["bentoml", "serve", package["bento_tag"], "--host", "127.0.0.1",
                                    "--port", str(port)], cwd=root, env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"bentoml serve exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"not ready in {START_TIMEOUT_S} s:\n{log.read_text()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        with httpx.Client(base_url=url, timeout=60) as client:
            yield {"client": client, "package": package, "model": ExportedModel.load(model_dir),
                   "recordings": recordings, "root": root, "log": log}
    finally:
        _stop(process)


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
