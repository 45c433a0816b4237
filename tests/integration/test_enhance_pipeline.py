"""Task enhance through the one dvc.yaml: pair validation, speaker splits, training, evaluation.

A tiny paired corpus (espeak speech in five kinds of noise) goes through `dvc repro` with
``task: enhance``; the test reads each stage's declared outputs. The validate_raw test breaks
pairs one way each and checks that every failure names its file.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from pipeline import audio
from pipeline.contracts import FeaturesFolder, ModelFolder
from pipeline.data import enhance_corpus, ingest
from pipeline.enhancement import METRICS, REFERENCE
from pipeline.models.enhancer import ExportedEnhancer
from pipeline.stages import validate_raw
from tests.conftest import _require_espeak
from tests.integration.repo import reduced_repo, sh

ENHANCE_PARAMS = {
    "task": "enhance",
    "validate_raw": {"sample_rates": [16000], "min_clips_per_class": 1},
    "featurize": {"split": {"n_folds": 3, "test_fraction": 0.25}},
    "validate_features": {"min_clips_per_fold_class": 5},
    "train": {"enhance": {"model": {"channels": 4, "depth": 2},
                          "trainer": {"max_epochs": 2, "progress_bar": False}}},
    "evaluate": {"bootstrap_resamples": 100, "enhance_samples": 2},
}
STAGES = ["validate_raw", "featurize", "validate_features", "pretrain", "filter", "train", "evaluate"]


@pytest.fixture(scope="module")
def enhance_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 speakers x 2 sentences, each in 5 noises: 8 clean and 40 noisy files."""
    _require_espeak()
    root = tmp_path_factory.mktemp("enhance_corpus") / "raw"
    enhance_corpus.build(root, n_speakers=4, n_utterances=2)
    return root


def _failures(raw: Path, tmp_path: Path) -> list[dict]:
    params = validate_raw.RawParams(sample_rates=[8000, 16000])
    validate_raw.run(raw, params, tmp_path / "m.parquet", tmp_path / "r.json", tmp_path / "gx", task="enhance")
    return json.loads((tmp_path / "r.json").read_text())["failures"]


def test_pair_validation_names_each_broken_pair(enhance_raw: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    shutil.copytree(enhance_raw, raw)
    meta = pd.read_csv(raw / "metadata.csv", dtype=str, keep_default_na=False)
    noisy = meta["path"].tolist()
    # 1: the clean side is missing; 2: the clean side at another rate; 3: lengths differ;
    # 4: a stated SNR out of bounds; 5: an SNR that is not a number; 6: no pair at all
    meta.loc[0, "pair"] = "clean/nobody/missing.wav"
    wave, rate = sf.read(raw / meta.loc[5, "pair"], dtype="float32")
    audio.write_wav(raw / "clean/other_rate.wav", audio.resample(wave, rate, 8000), 8000)
    meta.loc[5, "pair"] = "clean/other_rate.wav"
    audio.write_wav(raw / "clean/short.wav", wave[: len(wave) // 2], rate)
    meta.loc[10, "pair"] = "clean/short.wav"
    meta.loc[15, "snr_db"] = "45"
    meta.loc[20, "snr_db"] = "loud"
    meta.loc[25, "pair"] = ""
    meta.to_csv(raw / "metadata.csv", index=False)
    failures = [f for f in _failures(raw, tmp_path) if f["table"] == "pairs"]
    named = " | ".join(json.dumps(f) for f in failures)
    for i, problem in ((0, "file is missing"), (5, "sample rates differ"), (10, "lengths differ"),
                       (15, "snr_db 45 outside"), (20, "is not a number"), (25, "no clean reference")):
        assert noisy[i] in named and problem in named, f"{noisy[i]} ({problem}) not reported: {named}"
    ok = [p for i, p in enumerate(noisy) if i not in (0, 5, 10, 15, 20, 25)]
    assert not any(f"{p}:" in named for p in ok[:5]), "a good pair was reported"


def test_intact_pairs_pass(enhance_raw: Path, tmp_path: Path) -> None:
    assert [f for f in _failures(enhance_raw, tmp_path) if f["table"] == "pairs"] == []


def test_enhance_task_through_dvc_repro(enhance_raw: Path, tmp_path: Path, child_env: dict[str, str],
                                        params_writer) -> None:
    env = {k: v for k, v in child_env.items() if k not in ("MLFLOW_EXPERIMENT_NAME", "DVC_EXP_NAME")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    repo = reduced_repo(tmp_path / "repo", enhance_raw, env, params_writer, ENHANCE_PARAMS, STAGES)
    sh(["dvc", "repro"], repo, env, timeout=600)

    features = FeaturesFolder(repo / "data/features")
    index = features.enhance_index()
    assert features.task() == "enhance" and not features.array_path.exists()
    places = index.groupby("pair")["split"].nunique()
    assert (places == 1).all(), "a clean reference sits in two splits"
    assert not set(index.loc[index["split"] == "test", "group"]) & set(index.loc[index["split"] == "train", "group"])
    assert json.loads((repo / "reports/pretrain.json").read_text())["skipped"]
    assert pd.read_csv(repo / "data/ignored.csv").empty

    model = ModelFolder(repo / "models/train")
    assert model.task() == "enhance" and model.enhancer_info().sample_rate == 16000
    trained_on = set(pd.read_csv(model.training_files_path)["path"])
    assert not trained_on & set(index.loc[index["split"] == "test", "path"])

    predictions = pd.read_csv(repo / "reports/predictions.csv")
    test = index[index["split"] == "test"]
    assert sorted(predictions["path"]) == sorted(test["path"])
    for metric in METRICS:
        assert predictions[metric].notna().all() and predictions[REFERENCE + metric].notna().all()
    report = json.loads((repo / "reports/evaluate.json").read_text())
    assert report["task"] == "enhance" and report["utterances"] == len(test)
    assert set(report["wilcoxon_vs_baseline"]) == set(METRICS)
    assert report["model"]["si_snr_i"]["ci95"][0] <= report["model"]["si_snr_i"]["mean"] <= report["model"]["si_snr_i"]["ci95"][1]
    by_snr = pd.read_csv(repo / "reports/plots/enhance_by_snr.csv")
    assert set(by_snr["enhancer"]) == {"model", "spectral_gating", "noisy"}

    # The kept sample is what ExportedEnhancer.enhance (the service's call) gives for that file.
    enhanced = sorted((repo / "reports/plots/samples").glob("*_enhanced.wav"))
    assert len(enhanced) == 2
    stem = enhanced[0].name.removesuffix("_enhanced.wav")
    row = test[test["path"].map(lambda p: Path(p).stem) == stem].iloc[0]
    noisy = audio.load(repo / "data/raw" / row["path"], 16000)
    expected = ExportedEnhancer.load(repo / "models/train").enhance(noisy, 16000)
    saved, _ = sf.read(enhanced[0], dtype="float32")
    assert np.abs(saved - np.clip(expected, -1, 1)).max() <= 1.5 / 32768

    assert "up to date" in sh(["dvc", "status"], repo, env)


PAIR_PATTERN = r"noisy/(?P<group>spk\d+)/(?P<utt>u\d+)_(?P<noise>[a-z]+)_(?P<snr_db>-?\d+)\.wav"


def test_ingest_pairs_by_pattern_and_by_csv(enhance_raw: Path, tmp_path: Path) -> None:
    expected = pd.read_csv(enhance_raw / "metadata.csv", dtype=str).sort_values("path", ignore_index=True)
    found = ingest.scan_pairs(enhance_raw, PAIR_PATTERN, "clean/{group}/{utt}.wav")
    assert found.attrs["skipped"] == sorted(expected["pair"].unique())  # the clean files match no noisy pattern
    pd.testing.assert_frame_equal(found[["path", "group", "pair", "noise", "snr_db"]],
                                  expected[["path", "group", "pair", "noise", "snr_db"]])
    ingest.ingest(enhance_raw, found, tmp_path / "raw")
    copied = sorted(p.relative_to(tmp_path / "raw").as_posix() for p in (tmp_path / "raw").rglob("*.wav"))
    assert copied == sorted([*expected["path"], *expected["pair"].unique()])

    listing = expected.rename(columns={"path": "noisy", "pair": "clean"})[["noisy", "clean", "group", "snr_db"]]
    listing.to_csv(tmp_path / "pairs.csv", index=False)
    from_csv = ingest.read_pairs(enhance_raw, tmp_path / "pairs.csv")
    assert from_csv[["path", "pair", "group"]].equals(expected[["path", "pair", "group"]])


def test_ingest_pairs_names_a_missing_clean_file(enhance_raw: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"clean/spk00/u00\.flac"):
        ingest.scan_pairs(enhance_raw, PAIR_PATTERN, "clean/{group}/{utt}.flac")
    with pytest.raises(ValueError, match="does not define"):
        ingest.scan_pairs(enhance_raw, PAIR_PATTERN, "clean/{speaker}/{utt}.wav")
    (tmp_path / "bad.csv").write_text("noisy,clean\na.wav,b.wav\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['group'\]"):
        ingest.read_pairs(enhance_raw, tmp_path / "bad.csv")


def test_real_fsdd_mixtures_through_the_stages(shared_data: Path, tmp_path: Path, params_file,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Real clean speech (FSDD, 6 speakers x 2 utterances of 3 joined digits) in real-speech babble
    and the other noises: the
    stages' own functions validate, split, train (2 epochs), evaluate; the babble holds only
    other speakers' recordings."""
    from pipeline.config import load_section
    from pipeline.stages import evaluate, featurize, train, validate_features

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    src = shared_data / "fsdd" / "recordings"
    files = pd.DataFrame([(p.name, p.name.split("_")[1]) for p in sorted(src.glob("*.wav"))], columns=["path", "group"])
    raw = tmp_path / "raw"
    meta = enhance_corpus.from_recordings(src, files, raw, per_speaker=2)
    assert meta["group"].nunique() == 6 and len(meta) == 6 * 2 * len(enhance_corpus.NOISES)
    babble = meta[meta["noise"] == "babble"]
    for row in babble.itertuples():
        sources = enhance_corpus.babble_sources(row.group, sorted(meta["group"].unique()), 2, row.path)
        assert row.group not in {g for g, _ in sources}

    params = params_file({**ENHANCE_PARAMS, "validate_features": {"min_clips_per_fold_class": 2}})
    report = validate_raw.run(raw, load_section("validate_raw", validate_raw.RawParams, params),
                              tmp_path / "manifest.parquet", tmp_path / "raw.json", tmp_path / "gx", task="enhance")
    assert report.success, report.summary()
    featurize.run_enhance(tmp_path / "manifest.parquet", load_section("featurize", featurize.FeaturizeParams, params),
                          tmp_path / "features")
    checks = validate_features.run(tmp_path / "features", load_section(
        "validate_features", validate_features.FeatureChecks, params), tmp_path / "vf.json", tmp_path / "gxf")
    assert checks.success, checks.summary()
    summary = train.run_enhance(raw, tmp_path / "features", load_section("train", train.TrainParams, params),
                                tmp_path / "work", tmp_path / "model", tmp_path / "curves.csv", tmp_path / "run.json")
    assert summary["epochs"] == 2 and np.isfinite(summary["best/val/si_snr"])
    out = {k: tmp_path / f"{k}.csv" for k in ("predictions", "segments", "groups")}
    out.update(metrics=tmp_path / "evaluate.json", plots=tmp_path / "plots", run_id=tmp_path / "ev_run.json")
    out["plots"].mkdir()
    result = evaluate.run_enhance(raw, tmp_path / "features", tmp_path / "model",
                                  load_section("evaluate", evaluate.EvaluateParams, params), out)
    scores = pd.read_csv(out["predictions"])
    assert len(scores) == result["utterances"] > 0 and scores[list(METRICS)].notna().all().all()
    assert result["model"]["stoi"]["n"] == len(scores)  # joined digits: long enough for STOI
    # an untrained-enough model must at least not destroy the clean-ish inputs: SI-SNR at 15 dB input stays high
    assert scores.loc[scores["snr_db"] == 15, "si_snr"].mean() > 5
