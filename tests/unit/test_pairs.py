"""pipeline.pairs: every problem of a paired (noisy, clean) corpus is reported with the file(s) it concerns."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import audio
from pipeline.pairs import check_pair_splits, check_pairs

RATE = 16000


def write(root: Path, rel: str, seconds: float = 1.0, rate: int = RATE) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = 0.1 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate)
    audio.write_wav(path, wave.astype(np.float32), rate)
    return rel


def row(path: str, pair: object = "clean/a.wav", snr_db: float = 5.0) -> dict:
    return {"path": path, "group": "spk00", "pair": pair, "snr_db": snr_db, "noise": "pink", "voice": "en+m1/p35"}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write(tmp_path, "clean/a.wav")
    write(tmp_path, "noisy/a_pink_5.wav")
    return tmp_path


def test_consistent_pairs_have_no_problems(root: Path) -> None:
    meta = pd.DataFrame([row("noisy/a_pink_5.wav")])
    assert check_pairs(meta, root, 0.0, (-5, 15)) == []


@pytest.mark.parametrize("pair", [None, np.nan, "", "  "])
def test_a_noisy_file_without_its_clean_side(root: Path, pair: object) -> None:
    problems = check_pairs(pd.DataFrame([row("noisy/a_pink_5.wav", pair)]), root)
    assert problems == ["noisy/a_pink_5.wav: no clean reference (pair is empty)"]


def test_a_clean_side_missing_on_disk(root: Path) -> None:
    problems = check_pairs(pd.DataFrame([row("noisy/a_pink_5.wav", "clean/gone.wav")]), root)
    assert problems == ["noisy/a_pink_5.wav: clean reference unusable: clean/gone.wav: file is missing"]


def test_a_missing_or_broken_noisy_file(root: Path) -> None:
    (root / "noisy" / "cut.wav").write_bytes((root / "noisy" / "a_pink_5.wav").read_bytes()[:1000])
    problems = check_pairs(pd.DataFrame([row("noisy/gone.wav"), row("noisy/cut.wav")]), root)
    assert problems[0] == "noisy/gone.wav: file is missing"
    assert problems[1].startswith("noisy/cut.wav: truncated WAV")
    assert len(problems) == 2


def test_lengths_beyond_the_tolerance(root: Path) -> None:
    write(root, "noisy/long.wav", seconds=1.25)
    meta = pd.DataFrame([row("noisy/long.wav")])
    assert check_pairs(meta, root, length_tolerance_s=0.3) == []
    assert check_pairs(meta, root, length_tolerance_s=0.1) == [
        "noisy/long.wav (1.250 s) and clean/a.wav (1.000 s): lengths differ by 0.250 s > tolerance 0.1 s"]


def test_sample_rates_that_differ(root: Path) -> None:
    write(root, "noisy/narrow.wav", rate=8000)
    problems = check_pairs(pd.DataFrame([row("noisy/narrow.wav")]), root, length_tolerance_s=1.0)
    assert problems == ["noisy/narrow.wav (8000 Hz) and clean/a.wav (16000 Hz): sample rates differ"]


def test_a_stated_snr_out_of_bounds(root: Path) -> None:
    meta = pd.DataFrame([row("noisy/a_pink_5.wav", snr_db=30.0), row("noisy/a_pink_5.wav", snr_db=np.nan),
                         row("noisy/a_pink_5.wav", snr_db=-5.0)])
    assert check_pairs(meta, root, 0.0, (-5, 15)) == ["noisy/a_pink_5.wav: snr_db 30 outside [-5, 15] dB"]
    assert check_pairs(meta, root, 0.0) == []  # no bounds given, nothing checked


def test_each_clean_file_is_read_once(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(root, "noisy/a_hum_0.wav")
    calls: list[str] = []
    probe = audio.probe
    monkeypatch.setattr(audio, "probe", lambda path, name=None: calls.append(name) or probe(path, name))
    assert check_pairs(pd.DataFrame([row("noisy/a_pink_5.wav"), row("noisy/a_hum_0.wav")]), root) == []
    assert sorted(calls) == ["clean/a.wav", "noisy/a_hum_0.wav", "noisy/a_pink_5.wav"]


def test_a_clean_file_in_two_splits() -> None:
    index = pd.DataFrame({
        "path": ["noisy/a_pink_5.wav", "noisy/a_hum_0.wav", "noisy/b_pink_5.wav", "noisy/b_hum_0.wav"],
        "pair": ["clean/a.wav", "clean/a.wav", "clean/b.wav", "clean/b.wav"],
        "split": ["train", "test", "train", "train"]})
    assert check_pair_splits(index) == [
        "clean/a.wav: clean reference in 2 splits: test (noisy/a_hum_0.wav), train (noisy/a_pink_5.wav)"]
    assert check_pair_splits(index.assign(split="train")) == []
