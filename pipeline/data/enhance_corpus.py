"""Build a paired speech-enhancement corpus: clean sentences and the same sentences in noise.

``python -m pipeline.data.enhance_corpus`` speaks Harvard sentences with espeak-ng in several
voices (one voice variant is one speaker, the ``group``) and mixes each clean utterance with five
kinds of noise met in recordings: babble of other speakers (never the target speaker), pink and
brown noise, mains hum with its harmonics, and band-limited bursts. The SNR of each mix is exact:
the noise is scaled against the clean utterance's energy. Each clean utterance is mixed once with
every noise, each at a different SNR of ``SNRS`` (a Latin square over the utterances).

Layout under ``--out``::

    clean/<spk>/<utt>.wav
    noisy/<spk>/<utt>_<noise>_<snr>.wav
    metadata.csv          path,group,pair,snr_db,noise,voice (one row per noisy file)

Every random choice is seeded from the file name, so a rebuild is byte-identical.

``--from DIR --pattern REGEX`` mixes real clean recordings instead (FSDD, Speech Commands from
``../shared/data``; the pattern names ``(?P<group>...)``, the speaker), resampled to 16 kHz, with
babble made of the other speakers' real recordings::

    python -m pipeline.data.enhance_corpus --out data/raw --from ../shared/data/fsdd/recordings \\
        --pattern '\\d_(?P<group>[a-z]+)_\\d+\\.wav' --per-speaker 10
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import signal

from pipeline import audio
from pipeline.data.corpus import PITCHES, SAMPLE_RATE, VOICES, _rng, speak
from pipeline.data.ingest import audio_files
from pipeline.io import atomic_dir

# IEEE Harvard sentences, list 1 (public domain): phonetically balanced, 2-3 s when spoken.
SENTENCES = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
)
NOISES = ("babble", "pink", "brown", "hum", "bursts")
SNRS = (-5, 0, 5, 10, 15)
BABBLE_TALKERS = 3  # other speakers summed into one babble (fewer when the corpus has fewer)
PEAK = 0.95  # a mix louder than this is scaled down, with its clean side, to stay off PCM clipping


@dataclass(frozen=True)
class Speaker:
    group: str
    voice: str  # one of corpus.VOICES, checked byte-identical run to run (en+f3, say, is not)
    pitch: int
    speed: int


def speakers(count: int) -> list[Speaker]:
    """The first ``count`` speakers; babble needs at least one other speaker, hence 2 or more."""
    if not 2 <= count <= len(VOICES) * len(PITCHES):
        raise ValueError(f"speakers must be in [2, {len(VOICES) * len(PITCHES)}], got {count}")
    return [Speaker(f"spk{i:02d}", VOICES[i % len(VOICES)], PITCHES[(i // len(VOICES)) % len(PITCHES)],
                    140 + 10 * (i % 4)) for i in range(count)]


def _level(wave: np.ndarray, rms: float) -> np.ndarray:
    return wave * (rms / max(float(np.sqrt(np.mean(wave ** 2))), 1e-12))


def coloured_noise(n: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) Gaussian noise with power falling as 1/f**exponent: 1 is pink, 2 is brown."""
    freqs = np.fft.rfftfreq(n)
    shape = np.zeros_like(freqs)
    shape[1:] = freqs[1:] ** (-exponent / 2)  # amplitude ~ f^(-exponent/2); DC stays 0 (no offset)
    return np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * shape, n)


def hum(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) mains hum: 50 or 60 Hz and its first harmonics, odd ones stronger as from a transformer."""
    t = np.arange(n) / SAMPLE_RATE
    mains = rng.choice([50.0, 60.0])
    wave = np.zeros(n)
    for k in range(1, 9):
        weight = (1.0 if k % 2 else 0.4) / k
        wave += weight * np.sin(2 * np.pi * k * mains * t + rng.uniform(0, 2 * np.pi))
    return wave + 0.01 * rng.standard_normal(n)  # the amplifier's own hiss under the hum


def bursts(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) a few band-limited noise bursts (clatter, door, traffic) with smooth edges, silence between."""
    wave = np.zeros(n)
    for _ in range(int(rng.integers(3, 7))):
        length = min(n, int(rng.uniform(0.05, 0.3) * SAMPLE_RATE))
        low = rng.uniform(200.0, 3000.0)
        sos = signal.butter(4, (low, min(low * rng.uniform(1.5, 3.0), 7500.0)), btype="bandpass",
                            fs=SAMPLE_RATE, output="sos")
        start = int(rng.integers(0, n - length + 1))
        burst = signal.sosfilt(sos, rng.standard_normal(length)) * np.hanning(length)
        wave[start:start + length] += burst * rng.uniform(0.3, 1.0)
    return wave


def babble_sources(target: str, groups: list[str], n_utterances: int, key: str) -> list[tuple[str, int]]:
    """(speaker, utterance) pairs summed into the babble for ``target``: other speakers only."""
    rng = _rng(key + "/babble")
    others = [g for g in groups if g != target]
    talkers = rng.choice(others, size=min(BABBLE_TALKERS, len(others)), replace=False)
    return [(str(g), int(rng.integers(0, n_utterances))) for g in talkers]


def babble(sources: list[tuple[str, int]], clean: dict[tuple[str, int], np.ndarray], n: int,
           key: str) -> np.ndarray:
    """(n,) the ``sources``' clean utterances at equal level, each looped from a random offset."""
    rng = _rng(key + "/offsets")
    wave = np.zeros(n)
    for source in sources:
        talk = _level(clean[source], 1.0)
        wave += np.roll(np.resize(talk, n), int(rng.integers(0, len(talk))))
    return wave


def mix(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``clean + noise`` (both (T,)) with the noise scaled to exactly ``snr_db`` below the clean energy."""
    gain = np.sqrt(np.sum(clean ** 2) / (np.sum(noise ** 2) * 10 ** (snr_db / 10)))
    return clean + gain * noise


def peak_safe(clean: np.ndarray, mixes: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Scale a clean utterance and all its mixes by one factor when any would clip.

    One factor for all keeps every pair consistent (noisy = clean + noise sample by sample) and
    the SNRs unchanged, and lets all the mixes share one clean file.
    """
    factor = min(1.0, PEAK / max(float(np.abs(np.stack([clean, *mixes])).max()), 1e-12))
    return clean * factor, [m * factor for m in mixes]


def noise(kind: str, n: int, key: str, clean: dict[tuple[str, int], np.ndarray], target: str,
          n_utterances: int) -> np.ndarray:
    """(n,) noise of ``kind`` for the mix named ``key``; ``clean`` holds every speaker's utterances."""
    rng = _rng(key)
    if kind == "babble":
        groups = sorted({g for g, _ in clean})
        return babble(babble_sources(target, groups, n_utterances, key), clean, n, key)
    if kind == "pink":
        return coloured_noise(n, 1.0, rng)
    if kind == "brown":
        return coloured_noise(n, 2.0, rng)
    if kind == "hum":
        return hum(n, rng)
    if kind == "bursts":
        return bursts(n, rng)
    raise ValueError(f"unknown noise '{kind}'")


def build(out: Path, n_speakers: int = 4, n_utterances: int = 5) -> pd.DataFrame:
    """Write the corpus into ``out`` (replaced atomically) and return its metadata."""
    if not 1 <= n_utterances <= len(SENTENCES):
        raise ValueError(f"utterances must be in [1, {len(SENTENCES)}], got {n_utterances}")
    plan = speakers(n_speakers)
    clean: dict[tuple[str, int], np.ndarray] = {}
    for spk in plan:
        for u in range(n_utterances):
            # Speech level varies per utterance as across recording sessions (-30 to -20 dBFS RMS).
            level = 10 ** (_rng(f"{spk.group}/u{u}/level").uniform(-30.0, -20.0) / 20)
            clean[spk.group, u] = _level(speak(SENTENCES[u], spk.voice, spk.pitch, spk.speed).astype(np.float64),
                                         level)
    voices = {spk.group: f"{spk.voice}/p{spk.pitch}" for spk in plan}
    return write_mixtures(out, clean, n_utterances, {key: voices[key[0]] for key in clean})


def from_recordings(src: Path, files: pd.DataFrame, out: Path, per_speaker: int = 5, join: int = 3) -> pd.DataFrame:
    """Mixtures of real clean recordings. Each clean utterance joins ``join`` consecutive files (by
    path) of one group with 0.1 s of silence between (short clips such as spoken digits are
    under STOI's analysis window alone); ``per_speaker`` utterances per group of ``files``
    (columns path, group; relative to ``src``), resampled to 16 kHz and levelled as the espeak
    utterances are, each in every noise; the babble is other speakers' real recordings."""
    if per_speaker < 1 or join < 1:
        raise ValueError(f"per_speaker and join must be >= 1, got {per_speaker} and {join}")
    need = per_speaker * join
    chosen = files.sort_values("path").groupby("group", sort=True).head(need)
    counts = chosen.groupby("group").size()
    if (counts < need).any() or len(counts) < 2:
        raise ValueError(f"need >= 2 groups with {need} files each (per_speaker x join); got {counts.to_dict()}")
    gap = np.zeros(SAMPLE_RATE // 10)
    clean, source = {}, {}
    for group, rows in chosen.groupby("group", sort=True):
        paths = rows["path"].tolist()
        for u in range(per_speaker):
            parts = paths[u * join:(u + 1) * join]
            waves = [audio.load(src / rel, SAMPLE_RATE, name=rel).astype(np.float64) for rel in parts]
            speech = np.concatenate([w for wave in waves for w in (wave, gap)][:-1])
            level = 10 ** (_rng(f"{group}/u{u}/level").uniform(-30.0, -20.0) / 20)
            clean[str(group), u] = _level(speech, level)
            source[str(group), u] = "+".join(parts)
    return write_mixtures(out, clean, per_speaker, source)


def write_mixtures(out: Path, clean: dict[tuple[str, int], np.ndarray], n_utterances: int,
                   voice: dict[tuple[str, int], str]) -> pd.DataFrame:
    """Mix every clean utterance (speaker, index) with every noise into ``out`` (replaced
    atomically); ``voice`` fills the metadata column of that name. Returns the metadata."""
    rows = []
    with atomic_dir(out) as tmp:
        for group in sorted({g for g, _ in clean}):
            (tmp / "clean" / group).mkdir(parents=True)
            (tmp / "noisy" / group).mkdir(parents=True)
            for u in range(n_utterances):
                pair = f"clean/{group}/u{u:02d}.wav"
                speech = clean[group, u]
                snrs = [SNRS[(u + k) % len(SNRS)] for k in range(len(NOISES))]
                paths = [f"noisy/{group}/u{u:02d}_{kind}_{snr}.wav" for kind, snr in zip(NOISES, snrs)]
                mixes = [mix(speech, noise(kind, len(speech), path, clean, group, n_utterances), snr)
                         for kind, snr, path in zip(NOISES, snrs, paths)]
                speech, mixes = peak_safe(speech, mixes)
                audio.write_wav(tmp / pair, speech.astype(np.float32), SAMPLE_RATE)
                for kind, snr, path, wave in zip(NOISES, snrs, paths, mixes):
                    audio.write_wav(tmp / path, wave.astype(np.float32), SAMPLE_RATE)
                    rows.append({"path": path, "group": group, "pair": pair, "snr_db": snr,
                                 "noise": kind, "voice": voice[group, u]})
        meta = pd.DataFrame(rows)
        meta.to_csv(tmp / "metadata.csv", index=False, lineterminator="\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/raw_enhance"))
    parser.add_argument("--speakers", type=int, default=4)
    parser.add_argument("--utterances", type=int, default=5, choices=range(1, len(SENTENCES) + 1),
                        metavar=f"1..{len(SENTENCES)}")
    parser.add_argument("--from", dest="src", type=Path, help="real clean recordings to mix instead of espeak")
    parser.add_argument("--pattern", help="with --from: regex over the relative paths naming (?P<group>...)")
    parser.add_argument("--per-speaker", type=int, default=5, help="with --from: clean utterances per speaker")
    parser.add_argument("--join", type=int, default=3, help="with --from: recordings joined into one utterance")
    args = parser.parse_args(argv)
    if (args.src is None) != (args.pattern is None):
        parser.error("--from and --pattern go together")
    try:
        if args.src is None:
            meta = build(args.out, args.speakers, args.utterances)
        else:
            regex = re.compile(args.pattern)
            found = [(rel, m.group("group")) for rel in audio_files(args.src) if (m := regex.fullmatch(rel))]
            if not found:
                raise ValueError(f"no audio file under {args.src} matches --pattern {args.pattern!r}")
            meta = from_recordings(args.src, pd.DataFrame(found, columns=["path", "group"]), args.out,
                                   args.per_speaker, args.join)
    except (RuntimeError, ValueError, IndexError, re.error, audio.AudioError) as err:
        sys.exit(f"enhance_corpus: {err}")
    print(f"enhance_corpus: wrote {meta['pair'].nunique()} clean and {len(meta)} noisy files by "
          f"{meta['group'].nunique()} speakers to {args.out}")


if __name__ == "__main__":
    main()
