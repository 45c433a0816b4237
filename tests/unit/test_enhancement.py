"""pipeline.enhancement: SI-SNR against closed forms, PESQ/STOI ranges, the spectral-gating baseline."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import enhancement
from pipeline.enhancement import (METRICS, REFERENCE, pesq_score, si_snr, si_snr_improvement, si_snr_torch,
                                  spectral_gating, stoi_score, summarise, utterance_metrics)

RATE = 16000


def speech_like(seconds: float = 2.0, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """Voiced syllables: 19 harmonics of a gliding 120-160 Hz pitch under a 3 Hz on/off envelope."""
    n = int(seconds * rate)
    t = np.arange(n) / rate
    phase = 2 * np.pi * np.cumsum(140 + 20 * np.sin(2 * np.pi * 0.7 * t)) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 20))
    wave = voiced * np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None) ** 2
    wave += 0.005 * np.random.default_rng(seed).standard_normal(n)
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


def in_white_noise(clean: np.ndarray, snr_db: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(len(clean))
    noise *= np.sqrt(np.sum(clean.astype(np.float64) ** 2) / np.sum(noise ** 2) / 10 ** (snr_db / 10))
    return (clean + noise).astype(np.float32)


def test_si_snr_matches_the_closed_form() -> None:
    # Whole periods: the sines are zero-mean and orthogonal, so the projection of
    # 2 * ref + noise on ref is exactly 2 * ref and the residual is the noise:
    # SI-SNR = 10 log10(|2 ref|^2 / |noise|^2) = 10 log10(4 / 0.5^2).
    k = np.arange(8000)
    ref = np.sin(2 * np.pi * 5 * k / len(k))
    noise = 0.5 * np.sin(2 * np.pi * 13 * k / len(k))
    expected = 10 * np.log10(16.0)
    assert si_snr(2 * ref + noise, ref) == pytest.approx(expected, abs=1e-6)
    assert si_snr(torch.from_numpy(2 * ref + noise), torch.from_numpy(ref)) == pytest.approx(expected, abs=1e-6)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), gain=st.floats(0.1, 100.0), offset=st.floats(-1.0, 1.0),
       noise_level=st.floats(0.1, 10.0))
def test_si_snr_ignores_gain_and_offset(seed: int, gain: float, offset: float, noise_level: float) -> None:
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(2000)
    est = ref + noise_level * rng.standard_normal(2000)
    base = si_snr(est, ref)
    # Exact up to EPS, which weighs more the quieter the signals: these stay far above it.
    assert si_snr(gain * est + offset, ref) == pytest.approx(base, abs=1e-6)
    assert si_snr(est, gain * ref - offset) == pytest.approx(base, abs=1e-6)


def test_the_reference_itself_scores_very_high_and_silence_stays_finite() -> None:
    clean = speech_like()
    assert si_snr(clean, clean) > 80.0
    floor = 10 * np.log10(enhancement.EPS)  # silence in or out scores the floor, not NaN
    assert si_snr(np.zeros(100), np.zeros(100)) == pytest.approx(floor)
    assert si_snr(np.zeros(100), np.arange(100.0)) == pytest.approx(floor)
    assert si_snr(np.arange(100.0), np.zeros(100)) == pytest.approx(floor)


def test_si_snr_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        si_snr(np.ones(10), np.ones(11))
    with pytest.raises(ValueError, match=r"estimate must be a non-empty 1-D signal, got shape \(2, 5\)"):
        si_snr(np.ones((2, 5)), np.ones(10))


def test_improvement_is_the_gain_over_the_noisy_input() -> None:
    clean = speech_like()
    noisy = in_white_noise(clean, 0.0)
    assert si_snr(noisy, clean) == pytest.approx(0.0, abs=0.1)  # the stated SNR, as the noise is white
    assert si_snr_improvement(noisy, noisy, clean) == 0.0
    assert si_snr_improvement(clean, noisy, clean) == pytest.approx(si_snr(clean, clean) - si_snr(noisy, clean))


def test_batched_si_snr_equals_the_per_row_value() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 3000))
    est = ref + rng.uniform(0.1, 3.0, (4, 1)) * rng.standard_normal((4, 3000))
    batched = si_snr_torch(torch.from_numpy(est), torch.from_numpy(ref))
    assert batched.shape == (4,)
    np.testing.assert_allclose(batched.numpy(), [si_snr(e, r) for e, r in zip(est, ref)], atol=1e-6)


def test_negative_si_snr_is_a_loss_that_trains() -> None:
    torch.manual_seed(0)
    ref = torch.randn(3, 1000)
    est = (ref + torch.randn(3, 1000)).requires_grad_()
    before = si_snr_torch(est, ref).detach()
    loss = -si_snr_torch(est, ref).mean()
    loss.backward()
    assert est.grad is not None and torch.isfinite(est.grad).all() and est.grad.abs().sum() > 0
    with torch.no_grad():
        after = si_snr_torch(est - 50.0 * est.grad, ref)
    assert (after > before).all()


def test_batched_si_snr_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"both be \(B, T\)"):
        si_snr_torch(torch.zeros(2, 10), torch.zeros(2, 11))


@pytest.mark.parametrize("rate", [16000, 8000])
def test_pesq_and_stoi_top_out_on_the_reference_and_drop_in_noise(rate: int) -> None:
    clean = speech_like(rate=rate)
    noisy = in_white_noise(clean, 0.0)
    top = pesq_score(clean, clean, rate)
    assert top > (4.5 if rate == 16000 else 4.4)  # P.862.2 tops out at 4.64, P.862 at 4.55
    assert pesq_score(clean, noisy, rate) < top - 1.0
    assert stoi_score(clean, clean, rate) > 0.99
    assert stoi_score(clean, noisy, rate) < stoi_score(clean, clean, rate) - 0.05


@pytest.mark.parametrize("rate", [22050, 44100, 48000, 11025])
def test_pesq_names_an_unsupported_rate(rate: int) -> None:
    clean = speech_like(seconds=1.0, rate=rate)
    with pytest.raises(ValueError, match=f"got {rate} Hz"):
        pesq_score(clean, clean, rate)


def test_utterance_metrics_scores_enhanced_and_noisy_against_clean() -> None:
    clean = speech_like()
    noisy = in_white_noise(clean, 5.0)
    scores = utterance_metrics(clean, noisy, clean, RATE)
    assert set(scores) == {"si_snr", "si_snr_i", "pesq", "pesq_noisy", "stoi", "stoi_noisy"}
    assert scores["si_snr"] > 80.0 and scores["si_snr_i"] > 70.0  # a perfect enhancer
    assert scores["pesq"] > scores["pesq_noisy"] and scores["stoi"] > scores["stoi_noisy"]
    assert scores["pesq_noisy"] == pytest.approx(pesq_score(clean, noisy, RATE))


@pytest.mark.parametrize("n", [RATE * 2, 12345, 777])
def test_spectral_gating_keeps_the_length(n: int) -> None:
    wave = speech_like()[:n]
    out = spectral_gating(wave, RATE)
    assert out.shape == (n,) and out.dtype == np.float32 and np.isfinite(out).all()


def test_spectral_gating_leaves_clean_speech_mostly_intact() -> None:
    clean = speech_like()
    assert si_snr(spectral_gating(clean, RATE), clean) > 10.0
    assert si_snr(spectral_gating(torch.from_numpy(clean), RATE), clean) > 10.0


def test_spectral_gating_improves_speech_in_white_noise() -> None:
    clean = speech_like()
    noisy = in_white_noise(clean, 0.0)
    assert si_snr_improvement(spectral_gating(noisy, RATE), noisy, clean) > 1.0


def test_stoi_is_nan_where_the_reference_is_too_short_to_score() -> None:
    rng = np.random.default_rng(0)
    short = rng.standard_normal(2000) * 0.1  # 125 ms at 16 kHz: under STOI's 384 ms window
    assert np.isnan(stoi_score(short, short + 0.01 * rng.standard_normal(2000), 16000))


def test_summaries_leave_unscored_utterances_out() -> None:
    rng = np.random.default_rng(1)
    n = 12
    table = pd.DataFrame({m: rng.normal(5, 1, n) for m in METRICS}
                         | {REFERENCE + m: rng.normal(3, 1, n) for m in METRICS}
                         | {f"{m}_noisy": rng.normal(2, 1, n) for m in ("si_snr", "pesq", "stoi")})
    table.loc[[0, 1], "stoi"] = np.nan
    summary = summarise(table, n_resamples=200, seed=0)
    assert summary["model"]["stoi"]["n"] == n - 2
    assert summary["model"]["stoi"]["mean"] == pytest.approx(table["stoi"].iloc[2:].mean())
    assert summary["wilcoxon_vs_baseline"]["stoi"]["n"] == n - 2
    assert summary["model"]["pesq"]["n"] == n
