"""Long recordings as segments, end to end on real speech: featurize cuts windows, train learns
from them, evaluate aggregates segment -> file -> group (the all-filtered rule included), and the
service answers a long file exactly as evaluate scored it.

The recordings: each is five FSDD takes of one digit by one speaker, 0.3 s of silence apart
(3–5 s); the label is the digit's parity, the group the speaker.
"""
from __future__ import annotations

import contextlib
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

from pipeline import audio
from pipeline.contracts import FeaturesFolder
from pipeline.stages import evaluate, featurize, train, validate_raw
from tests.conftest import subprocess_env
from tests.integration.conftest import _free_port, _stop

pytestmark = pytest.mark.slow
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
SEGMENT = {"window_s": 1.27, "hop_s": 0.635, "aggregate": "mean"}


def long_recordings(fsdd: Path, out: Path) -> Path:
    rows = []
    for speaker in SPEAKERS:
        for digit in range(4):
            takes = [audio.load(fsdd / f"{digit}_{speaker}_{i}.wav", 8000) for i in range(5)]
            gap = np.zeros(2400, np.float32)
            wave = np.concatenate([x for take in takes for x in (take, gap)])
            rel = f"{speaker}/{speaker}_{digit}.wav"
            (out / speaker).mkdir(parents=True, exist_ok=True)
            audio.write_wav(out / rel, wave, 8000)
            rows.append({"path": rel, "label": "even" if digit % 2 == 0 else "odd", "group": speaker})
    pd.DataFrame(rows).to_csv(out / "metadata.csv", index=False)
    return out


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path, params_writer) -> dict:
    root = tmp_path_factory.mktemp("segments")
    raw = long_recordings(shared_data / "fsdd" / "recordings", root / "raw")
    params = params_writer(root / "params.yaml", {
        "validate_raw": {"label_column": "label", "classes": ["even", "odd"], "min_clips_per_class": 5},
        "featurize": {"label_column": "label", "segment": SEGMENT, "split": {"n_folds": 2}},
        "train": {"positive_class": "odd", "trainer": {"max_epochs": 2, "progress_bar": False}},
        "evaluate": {"bootstrap_resamples": 100}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(root)
        validate_raw.main(["--raw", str(raw), "--manifest", "manifest.parquet", "--result", "vr.json", "--docs", "gx",
                           "--params", str(params)])
        featurize.main(["--raw", str(raw), "--manifest", "manifest.parquet", "--out", "features", "--params", str(params)])
        index = FeaturesFolder(root / "features").index()
        test = index[index["split"] == "test"]
        files = test["file"].unique()
        # every segment of the first test file, and one of the second, are filtered out
        dropped = test.loc[test["file"] == files[0], "path"].tolist() + test.loc[test["file"] == files[1], "path"][:1].tolist()
        pd.DataFrame({"filename": dropped, "reason": "reconstruction_loss"}).to_csv("ignored.csv", index=False)
        train.main(["--features", "features", "--ignored", "ignored.csv", "--pretrained", "none", "--work", "work",
                    "--model", "model", "--curves", "curves.csv", "--metrics", "train.json", "--run-id", "tr.json",
                    "--params", str(params)])
        evaluate.main(["--features", "features", "--ignored", "ignored.csv", "--model", "model", "--pretrained", "none",
                       "--metrics", "evaluate.json", "--predictions", "predictions.csv", "--segments", "segments.csv",
                       "--groups", "groups.csv", "--plots", "plots", "--run-id", "ev.json", "--params", str(params)])
    return {"root": root, "raw": raw, "index": index, "dropped": dropped, "all_filtered_file": files[0]}


def test_featurize_cuts_every_recording_into_windows(pipeline_run: dict) -> None:
    index = pipeline_run["index"]
    assert len(index) > 3 * index["file"].nunique()  # several windows per file
    for file, rows in index.groupby("file"):
        assert rows["segment"].tolist() == list(range(len(rows)))
        np.testing.assert_allclose(rows["start_s"], rows["segment"] * 0.635, atol=1e-3)
        assert rows["path"].tolist() == [f"{file}#{k:04d}" for k in range(len(rows))]
        assert rows["group"].nunique() == 1 and rows["split"].nunique() == 1  # a file never spans splits
    duration = index.groupby("file")["duration_s"].first()
    counts = index.groupby("file").size()
    assert ((counts - 1) * 0.635 < duration).all()  # no window starts past the end


def test_files_aggregate_their_kept_segments_and_groups_vote(pipeline_run: dict) -> None:
    root = pipeline_run["root"]
    segments, files = pd.read_csv(root / "segments.csv"), pd.read_csv(root / "predictions.csv")
    groups = pd.read_csv(root / "groups.csv").set_index("group")
    assert set(segments.loc[~segments["kept"], "path"]) == set(pipeline_run["dropped"])
    for _, row in files.iterrows():
        mine = segments[segments["file"] == row["path"]]
        used = mine[mine["kept"]] if mine["kept"].any() else mine
        np.testing.assert_allclose([row["prob_even"], row["prob_odd"]],
                                   used[["prob_even", "prob_odd"]].mean().to_numpy(), atol=1e-6)
        assert row["kept"] == mine["kept"].any()
    assert not files.set_index("path").loc[pipeline_run["all_filtered_file"], "kept"]
    group = files.set_index("path").loc[pipeline_run["all_filtered_file"], "group"]
    assert groups.loc[group, "n_kept"] == groups.loc[group, "n_files"] - 1  # the vote skips that file
    metrics = json.loads((root / "evaluate.json").read_text())
    assert metrics["counts"]["test_files"] == len(files) and metrics["counts"]["kept_files"] == files["kept"].sum()


@pytest.fixture(scope="module")
def served(pipeline_run: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``bentoml serve`` of the service over the trained model, imported into a fresh store."""
    root = tmp_path_factory.mktemp("segments_serve")
    env = {**subprocess_env(), "BENTOML_HOME": str(root / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    tag = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path;"
                          "from pipeline.stages.package import PackageParams, import_model;"
                          "print(import_model(Path(sys.argv[1]), PackageParams(), {'mlflow_model': 'segments'}))",
                          str(pipeline_run["root"] / "model")], env=env, check=True, capture_output=True,
                         text=True).stdout.strip().splitlines()[-1]
    port = _free_port()
    log = root / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "serving.service:Soundline",
                                    "--host", "127.0.0.1", "--port", str(port)], cwd=Path(__file__).parents[2],
                                   env={**env, "SOUNDLINE_MODEL_TAG": tag}, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        _stop(process)


def test_the_service_answers_a_long_file_as_evaluate_scored_it(pipeline_run: dict, served: str) -> None:
    root = pipeline_run["root"]
    files = pd.read_csv(root / "predictions.csv").set_index("path")
    segments = pd.read_csv(root / "segments.csv")
    whole = [f for f in files.index if segments.loc[segments["file"] == f, "kept"].all()]  # nothing filtered
    for name in whole[:2] + [pipeline_run["all_filtered_file"]]:
        data = (pipeline_run["raw"] / name).read_bytes()
        for resp in (httpx.post(f"{served}/classify", files={"audio": (Path(name).name, data)}, timeout=60),
                     httpx.post(f"{served}/raw/classify", params={"name": name}, content=data, timeout=60)):
            assert resp.status_code == 200, resp.text
            body = resp.json()
            mine = segments[segments["file"] == name]
            assert [s["start_s"] for s in body["segments"]] == pytest.approx(mine["start_s"].tolist(), abs=1e-6)
            np.testing.assert_allclose([s["probabilities"]["odd"] for s in body["segments"]], mine["prob_odd"], atol=1e-5)
            if name in whole:  # evaluate's file probability is the served one
                assert body["probabilities"]["odd"] == pytest.approx(files.loc[name, "prob_odd"], abs=1e-5)
                assert body["label"] == files.loc[name, "predicted"]
