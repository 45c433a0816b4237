"""pipeline.data.enhance_corpus: exact SNRs, babble of others only, byte-identical builds."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import signal

from pipeline import audio
from pipeline.data import corpus, enhance_corpus as ec
from pipeline.pairs import check_pairs

RATE = ec.SAMPLE_RATE
TINY = {"n_speakers": 3, "n_utterances": 2}  # 6 clean and 30 noisy files, 2 s to build


def _require_espeak() -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (needed to speak the corpus): make espeak")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_espeak()
    out = tmp_path_factory.mktemp("enhance") / "raw_enhance"
    ec.build(out, **TINY)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_rebuild_is_byte_identical(tiny: Path, tmp_path: Path) -> None:
    ec.build(tmp_path / "again", **TINY)
    first, second = _files(tiny), _files(tmp_path / "again")
    assert len(first) == 6 + 30 + 1 and first == second


def test_every_voice_speaks_byte_identically() -> None:
    _require_espeak()
    for spk in ec.speakers(len(corpus.VOICES) * len(corpus.PITCHES)):
        a = corpus.speak(ec.SENTENCES[0], spk.voice, spk.pitch, spk.speed)
        b = corpus.speak(ec.SENTENCES[0], spk.voice, spk.pitch, spk.speed)
        assert a.tobytes() == b.tobytes(), f"{spk.voice}/p{spk.pitch} is not deterministic"


def test_metadata_lists_speakers_pairs_and_the_latin_square(tiny: Path) -> None:
    meta = pd.read_csv(tiny / "metadata.csv")
    assert list(meta.columns) == ["path", "group", "pair", "snr_db", "noise", "voice"]
    plan = ec.speakers(TINY["n_speakers"])
    assert sorted(meta["group"].unique()) == [s.group for s in plan]
    assert dict(zip(meta["group"], meta["voice"])) == {s.group: f"{s.voice}/p{s.pitch}" for s in plan}
    for pair, rows in meta.groupby("pair"):
        assert pair.startswith(f"clean/{rows['group'].iloc[0]}/")
        assert sorted(rows["noise"]) == sorted(ec.NOISES)  # every noise once ...
        assert rows["snr_db"].nunique() == len(ec.NOISES)  # ... each at another SNR
    assert set(meta["snr_db"]) == set(ec.SNRS)
    for r in meta.itertuples():
        assert r.path == f"noisy/{r.group}/{Path(r.pair).stem}_{r.noise}_{r.snr_db}.wav"
    assert check_pairs(meta, tiny, 0.0, (min(ec.SNRS), max(ec.SNRS))) == []


def test_each_mix_is_at_its_labelled_snr_and_clips_nowhere(tiny: Path) -> None:
    meta = pd.read_csv(tiny / "metadata.csv")
    for r in meta.itertuples():
        clean = audio.load(tiny / r.pair, RATE).astype(np.float64)
        noisy = audio.load(tiny / r.path, RATE).astype(np.float64)
        snr = 10 * np.log10(np.sum(clean ** 2) / np.sum((noisy - clean) ** 2))
        assert snr == pytest.approx(r.snr_db, abs=0.1), r.path
        assert np.abs(noisy).max() <= ec.PEAK + 1e-4 and np.abs(clean).max() <= ec.PEAK + 1e-4


@pytest.mark.parametrize("target", ["spk00", "spk01", "spk02", "spk03"])
def test_babble_never_holds_the_target_speaker(target: str) -> None:
    groups = [f"spk{i:02d}" for i in range(4)]
    for u in range(20):
        sources = ec.babble_sources(target, groups, 5, f"noisy/{target}/u{u:02d}_babble_0.wav")
        assert len(sources) == ec.BABBLE_TALKERS and target not in {g for g, _ in sources}
        assert len({g for g, _ in sources}) == len(sources)  # distinct talkers


def test_babble_is_made_of_the_other_speakers_signals_only() -> None:
    # Each speaker "talks" in its own frequency: the target's band must stay empty in its babble.
    t = np.arange(RATE) / RATE
    tones = {"spk00": 3000.0, "spk01": 300.0, "spk02": 700.0, "spk03": 1100.0}
    pool = {(g, u): np.sin(2 * np.pi * f * t) * (1 + u) for g, f in tones.items() for u in range(2)}
    wave = ec.noise("babble", 2 * RATE, "noisy/spk00/u00_babble_0.wav", pool, "spk00", 2)
    freqs, power = signal.welch(wave, RATE, nperseg=4096)
    peak = {f: power[np.abs(freqs - f) < 30].max() for f in tones.values()}
    assert peak[3000.0] < 1e-6 * min(peak[300.0], peak[700.0], peak[1100.0])
    assert np.count_nonzero(wave) == len(wave)  # looped: the babble fills the whole mix


def test_noise_is_seeded_by_the_file_name() -> None:
    pool = {(g, 0): np.sin(np.arange(RATE) * (0.1 + i)) for i, g in enumerate(["spk00", "spk01"])}
    for kind in ec.NOISES:
        a = ec.noise(kind, RATE, "noisy/spk00/u00.wav", pool, "spk00", 1)
        b = ec.noise(kind, RATE, "noisy/spk00/u00.wav", pool, "spk00", 1)
        c = ec.noise(kind, RATE, "noisy/spk00/u01.wav", pool, "spk00", 1)
        assert a.shape == (RATE,) and np.isfinite(a).all() and np.array_equal(a, b)
        assert not np.allclose(a, c), kind
    with pytest.raises(ValueError, match="unknown noise 'rain'"):
        ec.noise("rain", RATE, "k", pool, "spk00", 1)


@pytest.mark.parametrize(("exponent", "slope"), [(1.0, -1.0), (2.0, -2.0)])
def test_coloured_noise_falls_as_one_over_f_to_the_exponent(exponent: float, slope: float) -> None:
    wave = ec.coloured_noise(4 * RATE, exponent, np.random.default_rng(0))
    freqs, power = signal.welch(wave, RATE, nperseg=2048)
    band = (freqs > 100) & (freqs < 6000)
    fitted = np.polyfit(np.log10(freqs[band]), np.log10(power[band]), 1)[0]
    assert fitted == pytest.approx(slope, abs=0.15)
    assert abs(wave.mean()) < 0.05 * wave.std()


def test_hum_sits_on_the_mains_harmonics_and_bursts_on_a_few_stretches() -> None:
    hum = ec.hum(4 * RATE, np.random.default_rng(0))
    freqs, power = signal.welch(hum, RATE, nperseg=RATE)  # 1 Hz bins
    mains = freqs[np.argmax(power)]
    assert mains in (50.0, 60.0)
    harmonics = np.abs(freqs[:, None] - mains * np.arange(1, 9)).min(axis=1) <= 1.0  # Hann: +-1 bin
    assert power[harmonics].sum() > 0.99 * power.sum()
    assert all(power[freqs == mains * k][0] > 1e3 * np.median(power) for k in range(1, 9))
    bursts = ec.bursts(4 * RATE, np.random.default_rng(0))
    assert 0.0 < np.mean(bursts != 0.0) < 0.5  # mostly silence between bursts


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), snr_db=st.sampled_from(ec.SNRS), noise_gain=st.floats(1e-3, 1e3))
def test_mix_is_exactly_at_the_snr(seed: int, snr_db: int, noise_gain: float) -> None:
    rng = np.random.default_rng(seed)
    clean, noise = rng.standard_normal(1000), noise_gain * rng.standard_normal(1000)
    mixed = ec.mix(clean, noise, snr_db)
    assert 10 * np.log10(np.sum(clean ** 2) / np.sum((mixed - clean) ** 2)) == pytest.approx(snr_db, abs=1e-9)


def test_peak_safe_scales_the_clean_side_and_every_mix_alike() -> None:
    rng = np.random.default_rng(0)
    clean = 0.5 * rng.standard_normal(1000)
    mixes = [ec.mix(clean, rng.standard_normal(1000), snr) for snr in (-5, 15)]
    safe_clean, safe_mixes = ec.peak_safe(clean, mixes)
    factor = safe_clean[0] / clean[0]
    assert factor < 1.0 and max(np.abs(m).max() for m in safe_mixes) == pytest.approx(ec.PEAK)
    for before, after in zip(mixes, safe_mixes):
        np.testing.assert_allclose(after - safe_clean, factor * (before - clean))  # same noise, same SNR
    quiet = [0.01 * m for m in mixes]
    kept_clean, kept = ec.peak_safe(0.01 * clean, quiet)
    assert np.array_equal(kept_clean, 0.01 * clean) and all(np.array_equal(a, b) for a, b in zip(kept, quiet))


@pytest.mark.parametrize(("kwargs", "match"), [({"n_speakers": 1}, r"speakers must be in \[2, 16\]"),
                                               ({"n_utterances": 0}, r"utterances must be in \[1, 10\]")])
def test_sizes_out_of_range(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ec.build(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
