"""Build the embedded default corpus: spoken digits by synthetic speakers over good and bad channels.

``python -m pipeline.data.corpus`` speaks the ten digits with espeak-ng in many voice variants
(voice, pitch, speed: one variant is one "speaker", the ``group``). Each speaker is recorded
in two sessions. Half of the speakers are "good" (clean channel in both sessions, at two
gains); the other half are "bad" (each session degraded: noise, clipping, band-limiting or
dropouts), so ``quality`` is a group-level property, like a diagnosis is per patient.

Every random choice is seeded from the file name, so the same inputs give byte-identical
files and the committed ``data.dvc`` matches a fresh build.
"""
from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import signal

from pipeline import audio
from pipeline.io import atomic_dir

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Voices checked for byte-identical output run to run (some variants, e.g. en+f3, add jitter).
VOICES = ("en+m1", "en+m3", "en+m7", "en+f1", "en+f2", "en+f4", "en-us", "en-gb-scotland")
PITCHES = (35, 65)
DEGRADATIONS = ("noise", "clipping", "bandlimit", "dropout")
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Speaker:
    group: str
    voice: str
    pitch: int
    speed: int
    quality: str  # good | bad
    conditions: tuple[str, str]  # channel per session


def speakers(count: int) -> list[Speaker]:
    """The first ``count`` speakers; good and bad alternate so any prefix stays balanced."""
    if not 2 <= count <= len(VOICES) * len(PITCHES):
        raise ValueError(f"speakers must be in [2, {len(VOICES) * len(PITCHES)}], got {count}")
    out = []
    for i in range(count):
        voice, pitch = VOICES[i % len(VOICES)], PITCHES[(i // len(VOICES)) % len(PITCHES)]
        if i % 2 == 0:
            quality, conditions = "good", ("clean", "clean_quiet")
        else:
            k = i // 2
            conditions = (DEGRADATIONS[k % 4], DEGRADATIONS[(k + 1) % 4])
            quality = "bad"
        out.append(Speaker(f"spk{i:02d}", voice, pitch, 130 + 10 * (i % 5), quality, conditions))
    return out


def speak(text: str, voice: str, pitch: int, speed: int) -> np.ndarray:
    """Synthesize ``text`` with espeak-ng; returns a mono float32 wave at SAMPLE_RATE."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed: run `make corpus` (installs it) or "
                           "`apt-get install espeak-ng`")
    # -w writes a complete header; --stdout streams a WAV whose declared size is a placeholder.
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(wav), text],
                       check=True, capture_output=True)
        return audio.load(wav, SAMPLE_RATE, name=f"espeak-ng:{voice}:{text}")


def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


def degrade(wave: np.ndarray, condition: str, key: str) -> np.ndarray:
    """Apply a channel condition; randomness is seeded by ``key`` (the file name)."""
    rng = _rng(key)
    if condition == "clean":
        return wave
    if condition == "clean_quiet":  # a second clean session, 6 dB lower
        return wave * 0.5
    if condition == "noise":
        snr_db = rng.uniform(0.0, 10.0)
        noise_rms = np.sqrt(np.mean(wave**2)) / 10 ** (snr_db / 20)
        return wave + rng.normal(0.0, noise_rms, wave.shape)
    if condition == "clipping":
        limit = rng.uniform(0.05, 0.15) * np.abs(wave).max()
        return np.clip(wave * 1.0, -limit, limit) / limit * 0.9
    if condition == "bandlimit":
        cutoff = rng.uniform(500.0, 1200.0)
        sos = signal.butter(8, cutoff, btype="lowpass", fs=SAMPLE_RATE, output="sos")
        return signal.sosfiltfilt(sos, wave)
    if condition == "dropout":
        out = wave.copy()
        gap = int(0.06 * SAMPLE_RATE)
        for start in rng.integers(0, max(1, len(wave) - gap), size=4):
            out[start:start + gap] = 0.0
        return out
    raise ValueError(f"unknown channel condition '{condition}'")


def build(out: Path, n_speakers: int = 16, digits: int = 10) -> pd.DataFrame:
    """Write the corpus into ``out`` (replaced atomically) and return its metadata."""
    rows = []
    with atomic_dir(out) as tmp:
        for spk in speakers(n_speakers):
            for session, condition in enumerate(spk.conditions, start=1):
                for d in range(digits):
                    rel = f"{spk.group}/{spk.group}_s{session}_{d}.wav"
                    clean = speak(DIGITS[d], spk.voice, spk.pitch, spk.speed + 5 * session)
                    wave = np.clip(degrade(clean, condition, rel), -1.0, 1.0)
                    (tmp / spk.group).mkdir(exist_ok=True)
                    audio.write_wav(tmp / rel, wave.astype(np.float32), SAMPLE_RATE)
                    rows.append({"path": rel, "label": str(d), "group": spk.group,
                                 "quality": spk.quality, "session": session,
                                 "condition": condition, "voice": f"{spk.voice}/p{spk.pitch}"})
        meta = pd.DataFrame(rows)
        meta.to_csv(tmp / "metadata.csv", index=False, lineterminator="\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/raw"))
    parser.add_argument("--speakers", type=int, default=16)
    parser.add_argument("--digits", type=int, default=10, choices=range(2, 11), metavar="2..10")
    args = parser.parse_args(argv)
    try:
        meta = build(args.out, args.speakers, args.digits)
    except (RuntimeError, ValueError) as err:
        sys.exit(f"corpus: {err}")
    print(f"corpus: wrote {len(meta)} files by {meta['group'].nunique()} speakers to {args.out}")


if __name__ == "__main__":
    main()
