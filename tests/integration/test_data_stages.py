"""The data stages end to end: corpus and DVC round trips, real recordings, bad data, `dvc repro`.

Everything runs in tmp_path: the repo working tree is never written. The real recordings in
../shared/data are read in place (subsets are copied into tmp_path by pipeline.data.ingest).
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml

from pipeline import audio
from pipeline.data import ingest
from pipeline.stages import featurize, validate_features, validate_raw
from pipeline.config import load_section
from pipeline.features import FeatureParams, log_mel
from pipeline.splits import LeakageError, check_leakage

FSDD_PATTERN = r"(?P<label>\d)_(?P<group>[a-z]+)_\d+\.wav"
SC_PATTERN = r"(?P<label>[^/]+)/(?P<group>[0-9a-f]+)_nohash_\d+\.wav"

DATA_STAGES = ("validate_raw", "featurize", "validate_features")

# Params for the reduced default corpus (8 speakers, 40 clips per quality) in a tmp repo copy.
REDUCED_PARAMS = {
    "validate_raw": {"min_clips_per_class": 10},
    "featurize": {"split": {"test_fraction": 0.25, "n_folds": 3, "seed": 0}},
    "validate_features": {"min_clips_per_fold_class": 5},
}


# --- helpers ---------------------------------------------------------------------------

def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def sh(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a command; fail the test with its output if it exits non-zero."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def git_dvc_repo(path: Path, env: dict[str, str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    sh(["git", "init", "-q"], path, env)
    sh(["git", "config", "user.email", "tests@soundline.invalid"], path, env)
    sh(["git", "config", "user.name", "soundline tests"], path, env)
    sh(["dvc", "init", "-q"], path, env)
    sh(["dvc", "config", "core.analytics", "false"], path, env)
    return path


def stage_paths(root: Path) -> dict[str, Path]:
    return {"manifest": root / "manifest.parquet", "result": root / "reports" / "validate_raw.json",
            "docs": root / "reports" / "gx_raw", "features": root / "features",
            "fresult": root / "reports" / "validate_features.json", "fdocs": root / "reports" / "gx_features"}


def run_validate_raw(raw: Path, params: Path, out: dict[str, Path]) -> None:
    validate_raw.main(["--raw", str(raw), "--manifest", str(out["manifest"]), "--result", str(out["result"]),
                       "--docs", str(out["docs"]), "--params", str(params)])


def run_featurize(raw: Path, params: Path, out: dict[str, Path]) -> None:
    featurize.main(["--raw", str(raw), "--manifest", str(out["manifest"]), "--out", str(out["features"]),
                    "--params", str(params)])


def run_validate_features(params: Path, out: dict[str, Path]) -> None:
    validate_features.main(["--features", str(out["features"]), "--result", str(out["fresult"]),
                            "--docs", str(out["fdocs"]), "--params", str(params)])


def run_all_stages(raw: Path, params: Path, out: dict[str, Path]) -> pd.DataFrame:
    """validate_raw -> featurize -> validate_features, in process; returns the feature index."""
    run_validate_raw(raw, params, out)
    assert json.loads(out["result"].read_text())["success"] is True
    run_featurize(raw, params, out)
    run_validate_features(params, out)
    assert json.loads(out["fresult"].read_text())["success"] is True
    assert (out["fdocs"] / "index.html").exists() and (out["docs"] / "index.html").exists()
    return pd.read_parquet(out["features"] / "index.parquet")


def feature_params(params: Path) -> FeatureParams:
    return load_section("featurize", featurize.FeaturizeParams, params).features


def assert_features_consistent(out: dict[str, Path], params: FeatureParams, n: int) -> np.ndarray:
    features = np.load(out["features"] / "features.npy", mmap_mode="r")
    meta = json.loads((out["features"] / "meta.json").read_text())
    assert features.shape == (n, params.n_mels, params.frames) == tuple(meta["shape"])
    assert features.dtype == np.float32 and np.isfinite(features).all()
    return features


# --- a. corpus determinism ---------------------------------------------------------------

@pytest.mark.slow
def test_reduced_corpus_is_byte_identical_across_builds(corpus_dir: Path, tmp_path: Path,
                                                        build_reduced_corpus) -> None:
    build_reduced_corpus(tmp_path / "again")
    first, second = tree_hashes(corpus_dir), tree_hashes(tmp_path / "again")
    assert "metadata.csv" in first and len(first) == 81
    assert first == second


@pytest.mark.slow
def test_full_default_corpus_matches_the_committed_data_dvc(tmp_path: Path, repo_root: Path,
                                                             child_env: dict[str, str]) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (needed to build the default corpus)")
    repo = git_dvc_repo(tmp_path / "repo", child_env)
    committed = (repo_root / "data.dvc").read_text()
    (repo / "data.dvc").write_text(committed)
    sh([sys.executable, "-m", "pipeline.data.corpus", "--out", "data/raw"], repo, child_env)
    sh(["dvc", "add", "-q", "data/raw"], repo, child_env)  # rewrites data.dvc with the fresh hash
    assert (repo / "data.dvc").read_text() == committed
    assert json.loads(sh(["dvc", "status", "--json", "data.dvc"], repo, child_env).stdout) == {}


# --- b. dvc push / pull --------------------------------------------------------------------

@pytest.mark.slow
def test_dvc_push_pull_round_trip(corpus_dir: Path, tmp_path: Path, child_env: dict[str, str]) -> None:
    repo = git_dvc_repo(tmp_path / "repo", child_env)
    remote = tmp_path / "remote"
    sh(["dvc", "remote", "add", "-d", "local", str(remote)], repo, child_env)
    shutil.copytree(corpus_dir, repo / "data" / "raw")
    sh(["dvc", "add", "-q", "data/raw"], repo, child_env)
    sh(["dvc", "push", "-q"], repo, child_env)
    assert sum(1 for p in remote.rglob("*") if p.is_file()) == 82  # 81 files + the .dir listing
    before = tree_hashes(repo / "data" / "raw")
    shutil.rmtree(repo / "data" / "raw")
    shutil.rmtree(repo / ".dvc" / "cache")
    sh(["dvc", "pull", "-q"], repo, child_env)
    assert tree_hashes(repo / "data" / "raw") == before == tree_hashes(corpus_dir)


# --- ingest ----------------------------------------------------------------------------------

def fake_tree(root: Path, rels: list[str]) -> Path:
    for i, rel in enumerate(rels):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(f"RIFF fake audio {i}".encode())
    return root


def test_ingest_scan_parses_paths_and_skips_the_rest(tmp_path: Path) -> None:
    src = fake_tree(tmp_path / "src", ["yes/aa11_nohash_0.wav", "yes/aa11_nohash_1.WAV", "no/bb22_nohash_0.flac",
                                       "no/readme.txt", "no/bb22.wav", "_background_noise_/white.ogg"])
    meta = ingest.scan(src, r"(?P<label>[^/]+)/(?P<group>[0-9a-f]+)_nohash_(?P<take>\d+)\.(?i:wav|flac)")
    assert list(meta.columns) == ["path", "label", "group", "take"]
    assert meta.to_dict("records") == [
        {"path": "no/bb22_nohash_0.flac", "label": "no", "group": "bb22", "take": "0"},
        {"path": "yes/aa11_nohash_0.wav", "label": "yes", "group": "aa11", "take": "0"},
        {"path": "yes/aa11_nohash_1.WAV", "label": "yes", "group": "aa11", "take": "1"},
    ]
    assert meta.attrs["skipped"] == ["_background_noise_/white.ogg", "no/bb22.wav"]  # readme.txt: not audio


@pytest.mark.parametrize(("pattern", "missing"), [(r"(?P<label>\d)_\w+\.wav", "group"),
                                                  (r"\d_(?P<group>\w+)\.wav", "label")])
def test_ingest_pattern_must_name_label_and_group(tmp_path: Path, pattern: str, missing: str) -> None:
    with pytest.raises(ValueError, match=f"named group '{missing}'"):
        ingest.scan(tmp_path, pattern)
    with pytest.raises(SystemExit, match=f"named group '{missing}'"):
        ingest.main([str(tmp_path), "--pattern", pattern, "--out", str(tmp_path / "out")])


def test_ingest_copies_writes_metadata_and_reports(tmp_path: Path, capsys) -> None:
    names = [f"{d}_{s}_{n}.wav" for d in (1, 2) for s in ("ann", "bob") for n in range(4)]
    src = fake_tree(tmp_path / "src", [*names, "notes/x_y.wav"])
    out = tmp_path / "raw"
    ingest.main([str(src), "--pattern", FSDD_PATTERN, "--out", str(out), "--limit-per-group", "3"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "ingest: skipped 1 file(s) not matching --pattern, e.g.:" and printed[1] == "  notes/x_y.wav"
    assert printed[-1].startswith("next: run `dvc add ") and str(out) in printed[-1]
    meta = pd.read_csv(out / "metadata.csv", dtype=str, keep_default_na=False)
    assert list(meta.columns) == ["path", "label", "group"] and len(meta) == 12  # 3 per (speaker, digit)
    assert meta["path"].is_monotonic_increasing and meta.groupby(["label", "group"]).size().eq(3).all()
    assert tree_hashes(out) == {**{r: tree_hashes(src)[r] for r in meta["path"]},
                                "metadata.csv": tree_hashes(out)["metadata.csv"]}


def test_ingest_with_nothing_matching_is_an_error(tmp_path: Path) -> None:
    src = fake_tree(tmp_path / "src", ["a.wav", "b.mp3"])
    with pytest.raises(SystemExit, match="no audio file under .* matches --pattern"):
        ingest.main([str(src), "--pattern", FSDD_PATTERN, "--out", str(tmp_path / "raw")])
    assert not (tmp_path / "raw").exists()


def test_ingest_failure_leaves_the_old_output_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = fake_tree(tmp_path / "src", [f"1_ann_{n}.wav" for n in range(5)])
    out = tmp_path / "raw"
    ingest.main([str(src), "--pattern", FSDD_PATTERN, "--out", str(out)])
    before = tree_hashes(out)
    fake_tree(src, [f"2_bob_{n}.wav" for n in range(5)])
    calls = iter(range(100))

    def flaky_copy(a, b, *args, **kwargs):
        if next(calls) == 7:
            raise OSError(5, "Input/output error")
        return shutil.copyfile(a, b)

    monkeypatch.setattr(ingest.shutil, "copy2", flaky_copy)
    with pytest.raises(OSError, match="Input/output error"):
        ingest.main([str(src), "--pattern", FSDD_PATTERN, "--out", str(out)])
    assert tree_hashes(out) == before
    assert {p.name for p in tmp_path.iterdir()} == {"src", "raw"}  # no temporary folder left behind


# --- c, d. real recordings -----------------------------------------------------------------

@pytest.mark.slow
def test_fsdd_subset_through_every_stage(shared_data: Path, tmp_path: Path, params_file, capsys) -> None:
    raw = tmp_path / "raw"
    # digits 0 and 1 only (the other 2400 files are skipped), first 10 takes per speaker and digit
    ingest.main([str(shared_data / "fsdd" / "recordings"), "--pattern", FSDD_PATTERN.replace(r"\d)_", "[01])_", 1),
                 "--out", str(raw), "--limit-per-group", "10"])
    printed = capsys.readouterr().out
    assert "skipped 2400 file(s)" in printed and "copied 120 files (2 labels, 6 groups)" in printed
    assert "dvc add" in printed.splitlines()[-1]
    params = params_file({
        "validate_raw": {"label_column": "label", "classes": ["0", "1"], "sample_rates": [8000],
                         "min_duration_s": 0.1, "min_clips_per_class": 20},
        "featurize": {"label_column": "label", "split": {"test_fraction": 0.34, "n_folds": 2}},
        "validate_features": {"min_clips_per_fold_class": 10},
    })
    out = stage_paths(tmp_path)
    index = run_all_stages(raw, params, out)

    manifest = pd.read_parquet(out["manifest"])
    assert len(manifest) == 120 and set(manifest["sample_rate"]) == {8000}
    assert len(index) == 120 and index["group"].nunique() == 6
    check_leakage(index)
    assert index.groupby("group")["split"].nunique().max() == 1
    assert index.loc[index["split"] == "test", "group"].nunique() == 2
    assert sorted(index.loc[index["split"] == "train", "fold"].unique()) == [0, 1]

    fp = feature_params(params)  # the repo's featurize.features
    assert fp.sample_rate == 16000
    features = assert_features_consistent(out, fp, 120)
    # the 8 kHz files were resampled to 16 kHz: a row equals the features of the resampled wave
    for row in index.sample(5, random_state=0).itertuples():
        wave = audio.load(raw / row.path, fp.sample_rate)
        assert len(wave) == 2 * sf.info(raw / row.path).frames
        np.testing.assert_allclose(features[row.row], log_mel(wave, fp), atol=1e-4)
    # ... and so hold nothing above 4 kHz: those mel bands sit at the clip's floor (a measure
    # that holds under any normalization policy; native 16 kHz speech scores ~0.8-0.95 here)
    centers = librosa.mel_frequencies(fp.n_mels + 2, fmin=fp.fmin, fmax=fp.fmax or fp.sample_rate / 2)[1:-1]
    x = np.asarray(features, dtype=np.float64)
    top, floor = x.max(axis=(1, 2)), x.min(axis=(1, 2))
    depth = (top - x[:, centers > 4300].mean(axis=(1, 2))) / (top - floor)
    assert depth.mean() > 0.98


@pytest.mark.slow
def test_speech_commands_through_every_stage(shared_data: Path, tmp_path: Path, params_file) -> None:
    raw = tmp_path / "raw"
    ingest.main([str(shared_data / "speech_commands_mini"), "--pattern", SC_PATTERN, "--out", str(raw)])
    meta = pd.read_csv(raw / "metadata.csv", dtype=str)
    assert len(meta) == 300 and meta["label"].nunique() == 30 and meta["group"].nunique() == 41
    assert not (raw / "LICENSE").exists()
    # 41 speakers, 1-21 clips each, every word said by 10 speakers: at least one clip per place
    params = params_file({
        "validate_raw": {"label_column": "label", "classes": [], "sample_rates": [16000],
                         "min_clips_per_class": 5},
        "featurize": {"label_column": "label", "split": {"test_fraction": 0.25, "n_folds": 3}},
        "validate_features": {"min_clips_per_fold_class": 1},
    })
    out = stage_paths(tmp_path)
    index = run_all_stages(raw, params, out)
    check_leakage(index)
    assert len(index) == 300 and index.groupby("group")["split"].nunique().max() == 1
    places = index["split"].where(index["split"] == "test", "fold" + index["fold"].astype(str))
    assert pd.crosstab(places, index["label"]).shape == (4, 30)
    assert_features_consistent(out, feature_params(params), 300)


# --- e. bad data ---------------------------------------------------------------------------

SR = 16000
BAD_NAME = "g0/bad.wav"


def tone_wave(freq: float, seconds: float = 0.5, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav_bytes(wave: np.ndarray, sr: int = SR, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, subtype=subtype, format="WAV")
    return buf.getvalue()


@pytest.fixture
def small_raw(tmp_path: Path) -> Path:
    """A valid folder: 6 groups x labels a/b x 2 clips of distinct tones at 16 kHz."""
    raw = tmp_path / "raw"
    rows = []
    for g in range(6):
        for label, base in (("a", 300.0), ("b", 900.0)):
            for k in range(2):
                rel = f"g{g}/{label}{k}.wav"
                (raw / rel).parent.mkdir(parents=True, exist_ok=True)
                (raw / rel).write_bytes(wav_bytes(tone_wave(base + 37 * g + 11 * k)))
                rows.append({"path": rel, "label": label, "group": f"g{g}"})
    pd.DataFrame(rows).to_csv(raw / "metadata.csv", index=False)
    return raw


def add_file(raw: Path, rel: str, data: bytes, label: str = "a", group: str = "g0") -> None:
    (raw / rel).parent.mkdir(parents=True, exist_ok=True)
    (raw / rel).write_bytes(data)
    meta = pd.read_csv(raw / "metadata.csv", dtype=str)
    pd.concat([meta, pd.DataFrame([{"path": rel, "label": label, "group": group}])]).to_csv(
        raw / "metadata.csv", index=False)


SMALL_PARAMS = {
    "validate_raw": {"label_column": "label", "classes": [], "sample_rates": [8000, 16000],
                     "min_duration_s": 0.1, "min_clips_per_class": 1, "max_class_ratio": 3.0, "workers": 1},
    "featurize": {"label_column": "label", "split": {"test_fraction": 0.34, "n_folds": 2}, "workers": 1},
    "validate_features": {"min_clips_per_fold_class": 1},
}


def nan_wav() -> bytes:
    wave = tone_wave(440.0)
    wave[100:200] = np.nan
    return wav_bytes(wave, subtype="FLOAT")


BAD_FILES = {
    "truncated": (lambda: wav_bytes(tone_wave(440.0))[:-1000], "files.readable", "truncated WAV"),
    "not_audio": (lambda: b"<html>404 not found</html>\n" * 40, "files.readable", "not a decodable audio file"),
    "empty": (lambda: b"", "files.readable", "empty file"),
    "nan": (nan_wav, "files.finite", "non-finite samples"),
    "96khz": (lambda: wav_bytes(tone_wave(440.0, sr=96000), sr=96000), "files.sample_rate", "sample_rate=96000"),
}


def failed_checks(result: Path) -> dict[str, list[str]]:
    failures = json.loads(result.read_text())["failures"]
    return {f"{f['table']}.{f['column']}": f["offending"] for f in failures}


def expect_validate_raw_failure(raw: Path, params: Path, out: dict[str, Path], capsys) -> tuple[str, dict]:
    with pytest.raises(SystemExit) as exit_info:
        run_validate_raw(raw, params, out)
    assert exit_info.value.code not in (0, None)
    assert "validate_raw: FAILED" in str(exit_info.value.code)
    return capsys.readouterr().out, failed_checks(out["result"])


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_fails_validate_raw_naming_the_file(kind: str, small_raw: Path, tmp_path: Path,
                                                      params_file, capsys) -> None:
    make, check, reason = BAD_FILES[kind]
    add_file(small_raw, BAD_NAME, make())
    out = stage_paths(tmp_path)
    printed, failed = expect_validate_raw_failure(small_raw, params_file(SMALL_PARAMS), out, capsys)
    assert list(failed) == [check], failed  # exactly the right expectation, nothing else
    assert len(failed[check]) == 1 and failed[check][0].startswith(BAD_NAME)
    offending_lines = [line for line in printed.splitlines() if line.strip().startswith("- ")]
    assert len(offending_lines) == 1 and BAD_NAME in offending_lines[0], printed
    assert f"on {check}" in printed
    if kind != "96khz":  # the decode error is shown beside the file
        assert reason in offending_lines[0]
    else:
        assert reason in json.dumps(json.loads(out["result"].read_text()))


def test_featurize_refuses_a_manifest_with_unreadable_files(small_raw: Path, tmp_path: Path,
                                                           params_file, capsys) -> None:
    add_file(small_raw, BAD_NAME, b"")
    out, params = stage_paths(tmp_path), params_file(SMALL_PARAMS)
    expect_validate_raw_failure(small_raw, params, out, capsys)
    with pytest.raises(SystemExit, match="has unreadable files; run validate_raw first"):
        run_featurize(small_raw, params, out)
    assert not out["features"].exists()


def test_duplicate_content_with_conflicting_labels(small_raw: Path, tmp_path: Path, params_file, capsys) -> None:
    add_file(small_raw, "g5/copy.wav", (small_raw / "g0" / "a0.wav").read_bytes(), label="b", group="g5")
    printed, failed = expect_validate_raw_failure(small_raw, params_file(SMALL_PARAMS), stage_paths(tmp_path),
                                                  capsys)
    assert list(failed) == ["content.n_labels"]
    [offending] = failed["content.n_labels"]
    assert offending.startswith("g0/a0.wav=a; g5/copy.wav=b ")
    assert "g0/a0.wav=a; g5/copy.wav=b" in printed


def test_duplicate_content_with_the_same_label_is_accepted(small_raw: Path, tmp_path: Path,
                                                           params_file) -> None:
    add_file(small_raw, "g5/copy.wav", (small_raw / "g0" / "a0.wav").read_bytes(), label="a", group="g5")
    out = stage_paths(tmp_path)
    run_validate_raw(small_raw, params_file(SMALL_PARAMS), out)
    assert json.loads(out["result"].read_text())["success"] is True


def stereo_wav() -> tuple[bytes, np.ndarray]:
    left, right = tone_wave(500.0), tone_wave(1300.0) * 0.5
    return wav_bytes(np.stack([left, right], axis=1), subtype="FLOAT"), (left + right) / 2


@pytest.mark.slow
def test_stereo_is_downmixed_by_default(small_raw: Path, tmp_path: Path, params_file) -> None:
    data, mono = stereo_wav()
    add_file(small_raw, "g0/stereo.wav", data)
    out = stage_paths(tmp_path)
    params = params_file(SMALL_PARAMS)  # stereo: downmix, as in the repo's params.yaml
    index = run_all_stages(small_raw, params, out)
    assert pd.read_parquet(out["manifest"]).set_index("path").loc["g0/stereo.wav", "channels"] == 2
    row = int(index.set_index("path").loc["g0/stereo.wav", "row"])
    fp = feature_params(params)
    features = assert_features_consistent(out, fp, 25)
    np.testing.assert_allclose(features[row], log_mel(mono, fp), atol=1e-4)


def test_stereo_is_rejected_by_policy(small_raw: Path, tmp_path: Path, params_file, capsys) -> None:
    add_file(small_raw, "g0/stereo.wav", stereo_wav()[0])
    params = params_file({**SMALL_PARAMS, "validate_raw": {**SMALL_PARAMS["validate_raw"], "stereo": "reject"}})
    printed, failed = expect_validate_raw_failure(small_raw, params, stage_paths(tmp_path), capsys)
    assert list(failed) == ["files.channels"]
    [offending] = failed["files.channels"]
    assert offending.startswith("g0/stereo.wav (") and "channels=2" in offending
    assert "g0/stereo.wav" in printed


@pytest.mark.slow
def test_group_in_train_and_test_fails_validate_features(small_raw: Path, tmp_path: Path, params_file,
                                                         capsys) -> None:
    out, params = stage_paths(tmp_path), params_file(SMALL_PARAMS)
    index = run_all_stages(small_raw, params, out)
    capsys.readouterr()
    # move one clip of a training group into the test set
    leaked = sorted(index.loc[index["split"] == "train", "group"].unique())[0]
    row = index.index[index["group"] == leaked][0]
    index.loc[row, ["split", "fold"]] = ["test", -1]
    index.to_parquet(out["features"] / "index.parquet", index=False)

    with pytest.raises(LeakageError, match=f"group '{leaked}' in train/test"):
        check_leakage(index)
    with pytest.raises(SystemExit) as exit_info:
        run_validate_features(params, out)
    assert "validate_features: FAILED" in str(exit_info.value.code)
    failed = failed_checks(out["fresult"])
    assert list(failed) == ["groups.n_places"]
    [offending] = failed["groups.n_places"]
    assert offending.startswith(f"{leaked} (") and "n_places=2" in offending and "test" in offending
    printed = capsys.readouterr().out
    assert f"- {offending}" in printed


def test_failed_validation_leaves_whole_outputs(small_raw: Path, tmp_path: Path, params_file, capsys) -> None:
    out, params = stage_paths(tmp_path), params_file(SMALL_PARAMS)
    run_validate_raw(small_raw, params, out)
    old_manifest = out["manifest"].read_bytes()
    add_file(small_raw, BAD_NAME, wav_bytes(tone_wave(440.0))[:-1000])
    expect_validate_raw_failure(small_raw, params, out, capsys)
    # the manifest is whole: untouched, or a complete parquet of the new run
    if out["manifest"].read_bytes() != old_manifest:
        manifest = pd.read_parquet(out["manifest"])
        assert len(manifest) == 25 and not manifest.set_index("path").loc[BAD_NAME, "readable"]
    assert json.loads(out["result"].read_text())["success"] is False
    assert not [p.name for p in tmp_path.rglob("*.tmp")]


def test_crash_while_writing_the_manifest_keeps_the_old_one(small_raw: Path, tmp_path: Path, params_file,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out, params = stage_paths(tmp_path), params_file(SMALL_PARAMS)
    run_validate_raw(small_raw, params, out)
    old_manifest, old_result = out["manifest"].read_bytes(), out["result"].read_text()

    def half_write(self: pd.DataFrame, path, *args, **kwargs) -> None:
        Path(path).write_bytes(b"PAR1 half a parquet file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_write)
    add_file(small_raw, "g1/extra.wav", wav_bytes(tone_wave(640.0)))
    p = validate_raw.RawParams(**SMALL_PARAMS["validate_raw"])
    with pytest.raises(OSError, match="No space left"):
        validate_raw.run(small_raw, p, out["manifest"], out["result"], out["docs"])
    assert out["manifest"].read_bytes() == old_manifest
    assert out["result"].read_text() == old_result
    assert not [p.name for p in out["manifest"].parent.iterdir() if p.name.endswith(".tmp")]


# --- f. dvc repro ---------------------------------------------------------------------------

def repo_copy(dest: Path, repo_root: Path, corpus_dir: Path, env: dict[str, str], write_params) -> Path:
    """A tmp git+dvc repo with the stage definitions, params for the reduced corpus and its data."""
    git_dvc_repo(dest, env)
    # only the data stages: later stages (training, ...) are tested elsewhere
    pipeline_def = yaml.safe_load((repo_root / "dvc.yaml").read_text())
    missing = set(DATA_STAGES) - set(pipeline_def["stages"])
    assert not missing, f"dvc.yaml lacks stage(s) {sorted(missing)}"
    pipeline_def["stages"] = {k: v for k, v in pipeline_def["stages"].items() if k in DATA_STAGES}
    (dest / "dvc.yaml").write_text(yaml.safe_dump(pipeline_def, sort_keys=False))
    shutil.copy2(repo_root / ".dvcignore", dest / ".dvcignore")
    shutil.copytree(repo_root / "pipeline", dest / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(dest / "params.yaml", REDUCED_PARAMS)
    shutil.copytree(corpus_dir, dest / "data" / "raw")
    sh(["dvc", "add", "-q", "data/raw"], dest, env)
    return dest


@pytest.mark.slow
def test_dvc_repro_end_to_end(corpus_dir: Path, repo_root: Path, tmp_path: Path, child_env: dict[str, str],
                              params_writer) -> None:
    repo = repo_copy(tmp_path / "repo", repo_root, corpus_dir, child_env, params_writer)
    first = sh(["dvc", "repro"], repo, child_env)
    for stage in ("validate_raw", "featurize", "validate_features"):
        assert f"Running stage '{stage}'" in first.stdout
    assert json.loads((repo / "reports" / "validate_raw.json").read_text())["success"] is True
    assert json.loads((repo / "reports" / "validate_features.json").read_text())["success"] is True
    fp = feature_params(repo / "params.yaml")
    assert np.load(repo / "data" / "features" / "features.npy", mmap_mode="r").shape == (80, fp.n_mels, fp.frames)

    second = sh(["dvc", "repro"], repo, child_env)
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in second.stdout
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], repo, child_env).stdout

    sh(["git", "add", "-A"], repo, child_env)
    sh(["git", "commit", "-q", "-m", "baseline"], repo, child_env)
    assert fp.n_mels != 32
    exp = sh(["dvc", "exp", "run", "-S", "featurize.features.n_mels=32"], repo, child_env)
    assert "Running stage 'featurize'" in exp.stdout
    assert "Running stage 'validate_features'" in exp.stdout
    assert "Running stage 'validate_raw'" not in exp.stdout
    assert np.load(repo / "data" / "features" / "features.npy", mmap_mode="r").shape == (80, 32, fp.frames)
