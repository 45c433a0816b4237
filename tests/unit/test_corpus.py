"""pipeline.data.corpus: speaker plan and seeded channel degradations (no espeak-ng needed here)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import corpus
from pipeline.data.corpus import DEGRADATIONS, degrade, speakers

ALL_CONDITIONS = ("clean", "clean_quiet", *DEGRADATIONS)


def speech_like(n: int = 8000, seed: int = 0) -> np.ndarray:
    """A voiced-ish test wave: harmonics of 150 Hz under a slow envelope, plus a little noise."""
    t = np.arange(n) / corpus.SAMPLE_RATE
    wave = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 12)) * np.sin(np.pi * t / t[-1])
    wave += 0.01 * np.random.default_rng(seed).standard_normal(n)
    return (0.4 * wave / np.abs(wave).max()).astype(np.float32)


def test_speakers_alternate_good_and_bad() -> None:
    plan = speakers(16)
    assert [s.quality for s in plan] == ["good", "bad"] * 8
    assert [s.group for s in plan] == [f"spk{i:02d}" for i in range(16)]
    assert len({(s.voice, s.pitch) for s in plan}) == 16  # every speaker sounds different
    for s in plan:
        if s.quality == "good":
            assert s.conditions == ("clean", "clean_quiet")
        else:
            assert set(s.conditions) <= set(DEGRADATIONS) and s.conditions[0] != s.conditions[1]


@pytest.mark.parametrize("count", [2, 3, 7, 8])
def test_any_prefix_is_balanced(count: int) -> None:
    qualities = [s.quality for s in speakers(count)]
    assert abs(qualities.count("good") - qualities.count("bad")) <= 1
    assert speakers(count) == speakers(16)[:count]


def test_bad_speakers_cover_every_degradation() -> None:
    used = {c for s in speakers(16) if s.quality == "bad" for c in s.conditions}
    assert used == set(DEGRADATIONS)


@pytest.mark.parametrize("count", [1, 0, 17])
def test_speaker_count_out_of_range(count: int) -> None:
    with pytest.raises(ValueError, match=r"speakers must be in \[2, 16\]"):
        speakers(count)


@pytest.mark.parametrize("condition", ALL_CONDITIONS)
def test_degrade_is_deterministic_for_the_same_key(condition: str) -> None:
    wave = speech_like()
    a = degrade(wave.copy(), condition, "spk01/spk01_s1_3.wav")
    b = degrade(wave.copy(), condition, "spk01/spk01_s1_3.wav")
    np.testing.assert_array_equal(a, b)
    assert a.shape == wave.shape and np.isfinite(a).all()


@pytest.mark.parametrize("condition", DEGRADATIONS)
def test_degrade_differs_for_another_key(condition: str) -> None:
    wave = speech_like()
    a = degrade(wave.copy(), condition, "spk01/spk01_s1_3.wav")
    b = degrade(wave.copy(), condition, "spk01/spk01_s1_4.wav")
    assert not np.allclose(a, b)


@pytest.mark.parametrize("condition", [c for c in ALL_CONDITIONS if c != "clean"])
def test_each_condition_changes_the_wave(condition: str) -> None:
    wave = speech_like()
    out = degrade(wave.copy(), condition, "key.wav")
    assert np.sqrt(np.mean((out - wave) ** 2)) > 0.01 * np.sqrt(np.mean(wave ** 2))


def test_clean_is_untouched_and_quiet_is_6_db_lower() -> None:
    wave = speech_like()
    np.testing.assert_array_equal(degrade(wave, "clean", "k"), wave)
    np.testing.assert_allclose(degrade(wave, "clean_quiet", "k"), wave * 0.5)


def test_degradations_do_what_they_say() -> None:
    wave = speech_like()
    clipped = degrade(wave, "clipping", "k")
    assert np.mean(np.isclose(np.abs(clipped), 0.9)) > 0.2  # flat tops at 0.9 of full scale
    dropped = degrade(wave, "dropout", "k")
    assert np.sum((dropped == 0) & (wave != 0)) >= int(0.06 * corpus.SAMPLE_RATE)
    low = degrade(wave, "bandlimit", "k")
    spectrum, original = np.abs(np.fft.rfft(low)), np.abs(np.fft.rfft(wave))
    freqs = np.fft.rfftfreq(len(wave), 1 / corpus.SAMPLE_RATE)
    assert spectrum[freqs > 2500].sum() < 0.01 * original[freqs > 2500].sum()
    noisy = degrade(wave, "noise", "k")
    assert np.std(noisy - wave) > 0.01


def test_unknown_condition() -> None:
    with pytest.raises(ValueError, match="unknown channel condition 'reverb'"):
        degrade(speech_like(), "reverb", "k")
