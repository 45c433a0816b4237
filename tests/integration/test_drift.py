"""The drift guard on real data: a profile of the training split flags a 4 kHz heart-sound-like
recording sent to the speech model, and leaves the test split's own files alone.

The default (reduced) corpus is featurized as the pipeline does; the profile is built from its
training split exactly as the train stage builds it; every test-split file is then scored the
way the service scores an upload (``pipeline.scoring``). FSDD's held-out speakers are checked
too, and both false-alarm rates are printed.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import audio, profile
from pipeline.contracts import FeaturesFolder
from pipeline.models.inference import ExportedModel
from pipeline.scoring import answer, prepare, score_clips
from pipeline.stages import featurize, validate_raw

pytestmark = pytest.mark.slow


def heart_like(seconds: float = 6.0, rate: int = 4000, seed: int = 0) -> bytes:
    """Stethoscope-like: 'lub-dub' pairs of damped 40–120 Hz tones at 72 beats a minute in noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.01 * rng.standard_normal(len(t))
    for beat in np.arange(0.2, seconds - 0.5, 60 / 72):
        for offset, freq, amp in ((0.0, 50.0, 0.6), (0.3, 90.0, 0.4)):
            start = beat + offset
            mask = (t >= start) & (t < start + 0.12)
            wave[mask] += amp * np.exp(-(t[mask] - start) / 0.03) * np.sin(2 * np.pi * freq * (t[mask] - start))
    buf = io.BytesIO()
    audio.write_wav(buf, np.clip(wave, -1, 1).astype(np.float32), rate)
    return buf.getvalue()


def profiled(raw: Path, root: Path, params: Path) -> tuple[pd.DataFrame, profile.Profile, ExportedModel]:
    """Features of ``raw``, the profile of its training split, and a model whose front end is the
    stage's (the checks need no trained weights: only the features are compared)."""
    from tests.integration.test_serving import _model_folder  # a CNN exported as the train stage does

    validate_raw.main(["--raw", str(raw), "--manifest", str(root / "manifest.parquet"), "--result",
                       str(root / "vr.json"), "--docs", str(root / "gx"), "--params", str(params)])
    featurize.main(["--raw", str(raw), "--manifest", str(root / "manifest.parquet"), "--out", str(root / "features"),
                    "--params", str(params)])
    folder = FeaturesFolder(root / "features")
    index, manifest = folder.index(), pd.read_parquet(root / "manifest.parquet")
    train = index[index["split"] == "train"]
    drift_profile = profile.build(manifest[manifest["path"].isin(train["file"])], folder.array(), train["row"].to_numpy())
    model = ExportedModel.load(_model_folder(root / "model", features=folder.meta().features))
    return index, drift_profile, model


def false_alarms(index: pd.DataFrame, raw: Path, drift_profile: profile.Profile, model: ExportedModel) -> dict:
    failed = {}
    for path in index.loc[index["split"] == "test", "file"].unique():
        upload = prepare((raw / path).read_bytes(), path, model)
        failed[path] = answer(model, upload, score_clips(model, upload.clips), drift_profile).drift
    flagged = {p: f for p, f in failed.items() if f}
    return {"files": len(failed), "flagged": flagged, "rate": len(flagged) / len(failed)}


def test_heart_sounds_are_flagged_and_the_test_split_is_not(corpus_dir: Path, tmp_path: Path, params_writer) -> None:
    params = params_writer(tmp_path / "params.yaml", {"validate_raw": {"min_clips_per_class": 5},
                                                      "featurize": {"split": {"n_folds": 2}}})
    index, drift_profile, model = profiled(corpus_dir, tmp_path, params)
    upload = prepare(heart_like(), "heart.wav", model)
    drift = answer(model, upload, score_clips(model, upload.clips), drift_profile).drift
    # the corpus's band-limited "bad" channels sound alike in spectrum; the rate gives it away
    assert "sample_rate" in drift, drift
    report = false_alarms(index, corpus_dir, drift_profile, model)
    print(f"drift guard, default corpus: {len(report['flagged'])} of {report['files']} test files flagged "
          f"({report['rate']:.1%}): {report['flagged']}")
    assert report["rate"] <= 0.01, report


def test_fsdd_held_out_speakers_are_not_flagged(shared_data: Path, tmp_path: Path, params_writer) -> None:
    from pipeline.data import ingest

    raw = tmp_path / "raw"
    src = shared_data / "fsdd" / "recordings"
    meta = ingest.limit_per_group(ingest.scan(src, r"(?P<label>\d)_(?P<group>[a-z]+)_\d+\.wav"), 5)
    ingest.ingest(src, meta, raw)
    params = params_writer(tmp_path / "params.yaml", {
        "validate_raw": {"label_column": "label", "classes": [], "min_duration_s": 0.1, "min_clips_per_class": 5},
        "featurize": {"label_column": "label", "split": {"n_folds": 2}}})
    index, drift_profile, model = profiled(raw, tmp_path, params)
    upload = prepare(heart_like(), "heart.wav", model)
    assert {"sample_rate", "duration"} <= set(answer(model, upload, score_clips(model, upload.clips), drift_profile).drift)
    report = false_alarms(index, raw, drift_profile, model)
    print(f"drift guard, FSDD held-out speakers: {len(report['flagged'])} of {report['files']} files flagged "
          f"({report['rate']:.1%}): {report['flagged']}")
    assert report["rate"] <= 0.05, report
