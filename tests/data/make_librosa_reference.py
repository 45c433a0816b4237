"""Regenerate tests/data/librosa_reference.npz, the stored librosa log-mel of a fixed test wave.

    python tests/data/make_librosa_reference.py

The wave: 1 s at 16 kHz, a 100 Hz -> 6 kHz exponential chirp at 0.5 amplitude plus Gaussian
noise (seed 0, std 0.01) and a 440 Hz tone that starts at 0.5 s, quantized to the 16-bit grid
(k / 32768) so the float32 array compresses well and is the same on every machine.
The reference is librosa's own log-mel of that wave, padded to the clip length the default
params give (frames=128, hop=160 -> 20320 samples) by ``pipeline.features.fit_length``:

    librosa.power_to_db(librosa.feature.melspectrogram(y=..., sr=16000, n_fft=512, hop_length=160,
        n_mels=64, power=2.0, center=True, pad_mode="constant"), ref=1.0, amin=1e-10, top_db=80)

tests/unit/test_features.py compares pipeline.features.log_mel against it, so a change in our
STFT, window, filterbank or dB conversion that moves the features away from librosa fails.
"""
from __future__ import annotations

from pathlib import Path

import librosa
import numpy as np
from scipy.signal import chirp

from pipeline.features import FeatureParams, fit_length

SR = 16000
OUT = Path(__file__).with_name("librosa_reference.npz")


def reference_wave() -> np.ndarray:
    t = np.arange(SR) / SR
    wave = 0.5 * chirp(t, f0=100.0, t1=1.0, f1=6000.0, method="logarithmic")
    wave += 0.01 * np.random.default_rng(0).standard_normal(SR)
    wave += 0.2 * np.sin(2 * np.pi * 440.0 * t) * (t >= 0.5)
    return (np.round(np.clip(wave, -1, 1) * 32767) / 32768).astype(np.float32)


def main() -> None:
    params = FeatureParams(sample_rate=SR, n_fft=512, hop_length=160, n_mels=64, frames=128)
    wave = reference_wave()
    mel = librosa.feature.melspectrogram(y=fit_length(wave, params), sr=SR, n_fft=512, hop_length=160,
                                         n_mels=64, power=2.0, center=True, pad_mode="constant")
    db = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=80)
    np.savez_compressed(OUT, wave=wave, log_mel=db.astype(np.float32), sample_rate=SR,
                        librosa_version=librosa.__version__)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes): wave {wave.shape}, log_mel {db.shape}")


if __name__ == "__main__":
    main()
