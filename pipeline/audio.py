"""The one module that decodes audio.

Everything that turns bytes into samples (stages, serving, tests) goes through here, so the
same file is decoded the same way everywhere and a bad file gets the same clear error.
"""
from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

Source = str | Path | bytes


class AudioError(ValueError):
    """A recording cannot be used; the message names the source and the problem."""

    def __init__(self, source: str, problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem


class NonFiniteAudio(AudioError):
    """The file decodes, but some samples are NaN or infinite."""


@dataclass(frozen=True)
class AudioInfo:
    """Header facts about a recording (no samples decoded)."""

    sample_rate: int
    channels: int
    frames: int
    subtype: str  # libsndfile subtype, e.g. PCM_16, FLOAT
    bit_depth: int  # 0 where the format has none (compressed)

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


_BIT_DEPTH = {"PCM_U8": 8, "PCM_S8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32,
              "FLOAT": 32, "DOUBLE": 64, "ULAW": 8, "ALAW": 8}


def _name(source: Source, name: str | None) -> str:
    if name:
        return name
    return "<bytes>" if isinstance(source, bytes) else str(source)


def _raw_bytes(source: Source, name: str) -> bytes:
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as err:
            raise AudioError(name, f"cannot read file ({err.strerror})") from err
    if not data:
        raise AudioError(name, "empty file (0 bytes)")
    return data


# WAVE format tags: PCM, IEEE float, A-law, mu-law, extensible (its sub-format says which)
_WAV_BITS = {0x0001: (8, 16, 24, 32), 0x0003: (32, 64), 0x0006: (8,), 0x0007: (8,), 0xFFFE: (8, 16, 24, 32, 64)}


@dataclass(frozen=True)
class _Wav:
    """Where a WAV file's samples are and how they are stored (from its checked header)."""

    tag: int
    channels: int
    sample_rate: int
    bits: int
    offset: int  # of the data chunk's first byte
    size: int  # of the data chunk; 0xFFFFFFFF in RF64


def _check_fmt(body: bytes, name: str) -> tuple[int, int, int, int]:
    """Reject a ``fmt `` chunk whose fields contradict each other or name an unknown codec;
    return its format tag, channels, sample rate and bits per sample.

    libsndfile decodes some inconsistent headers anyway (12 bits per sample with a block align
    of one byte, say), which would enter the data as noise that looks like audio.
    """
    if len(body) < 16:
        raise AudioError(name, f"malformed WAV: fmt chunk of {len(body)} bytes (at least 16)")
    tag, channels, rate, byte_rate, align, bits = struct.unpack("<HHIIHH", body[:16])
    if tag not in _WAV_BITS:
        raise AudioError(name, f"unsupported WAV codec (format tag 0x{tag:04x}); send PCM, float, A-law or mu-law")
    if channels == 0 or rate == 0:
        raise AudioError(name, f"malformed WAV: {channels} channels at {rate} Hz")
    if bits not in _WAV_BITS[tag]:
        raise AudioError(name, f"malformed WAV: {bits} bits per sample for format tag 0x{tag:04x}")
    if align != channels * ((bits + 7) // 8):
        raise AudioError(name, f"malformed WAV: block align {align} bytes, but {channels} channels of "
                               f"{bits} bits need {channels * ((bits + 7) // 8)}")
    if byte_rate != rate * align:
        raise AudioError(name, f"malformed WAV: byte rate {byte_rate}, but {rate} Hz x {align} bytes is {rate * align}")
    return tag, channels, rate, bits


def _check_riff(data: bytes, name: str) -> _Wav | None:
    """Reject WAV files whose header contradicts itself or whose data chunk is shorter than it
    says; return the layout of a WAV file (None for other containers).

    libsndfile silently decodes the part that is there, so a copy cut short by a crash or a
    partial download would otherwise enter the dataset as a shorter, valid-looking clip.
    """
    if data[:4] not in (b"RIFF", b"RF64") or data[8:12] != b"WAVE":
        return None
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        chunk_id, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if chunk_id == b"fmt ":
            if pos + 8 + size > len(data):
                raise AudioError(name, f"truncated WAV: fmt chunk declares {size} bytes, {len(data) - pos - 8} present")
            fmt = _check_fmt(data[pos + 8:pos + 8 + size], name)
        if chunk_id == b"data":
            if fmt is None:
                raise AudioError(name, "malformed WAV: data chunk before any fmt chunk")
            available = len(data) - pos - 8
            # RF64 stores the real size elsewhere and writes 0xFFFFFFFF here.
            if size != 0xFFFFFFFF and available < size:
                raise AudioError(
                    name, f"truncated WAV: data chunk declares {size} bytes, {available} present"
                )
            return _Wav(*fmt, offset=pos + 8, size=size)
        pos += 8 + size + (size & 1)
    raise AudioError(name, "WAV file has no data chunk")


# The two encodings nearly every upload uses, read straight from the bytes: libsndfile's
# virtual-file open costs more than the decode itself on a 1 s clip. Its float conversion of
# 16-bit PCM is x / 32768, exactly what this gives (tests/unit/test_audio.py compares them).
_NUMPY_WAV = {(0x0001, 16): ("<i2", "PCM_16", 1 / 32768), (0x0003, 32): ("<f4", "FLOAT", 1.0)}


def _plain_info(wav: _Wav) -> AudioInfo | None:
    """Header facts of a 16-bit PCM or 32-bit float WAV; None for anything else (libsndfile's)."""
    if (wav.tag, wav.bits) not in _NUMPY_WAV or wav.size == 0xFFFFFFFF:
        return None
    frames = wav.size // (wav.channels * wav.bits // 8)
    return AudioInfo(wav.sample_rate, wav.channels, frames, _NUMPY_WAV[wav.tag, wav.bits][1], wav.bits)


def _read_plain(data: bytes, wav: _Wav, info: AudioInfo) -> np.ndarray:
    dtype, _, scale = _NUMPY_WAV[wav.tag, wav.bits]
    raw = np.frombuffer(data, dtype=dtype, count=info.frames * info.channels, offset=wav.offset)
    samples = raw.reshape(info.frames, info.channels).astype(np.float32)
    if scale != 1.0:
        samples *= np.float32(scale)
    return samples


def _open(data: bytes, name: str) -> sf.SoundFile:
    try:
        return sf.SoundFile(io.BytesIO(data))
    except sf.LibsndfileError as err:
        raise AudioError(name, f"not a decodable audio file ({err.error_string.rstrip('.')})") from err
    except (RuntimeError, TypeError) as err:
        raise AudioError(name, f"not a decodable audio file ({err})") from err


def probe(source: Source, name: str | None = None) -> AudioInfo:
    """Read the header of ``source`` (path or bytes) after the same checks as :func:`decode`."""
    label = _name(source, name)
    data = _raw_bytes(source, label)
    wav = _check_riff(data, label)
    plain = _plain_info(wav) if wav else None
    if plain is not None:
        return plain
    with _open(data, label) as f:
        return _info(f)


def _info(f: sf.SoundFile) -> AudioInfo:
    return AudioInfo(sample_rate=f.samplerate, channels=f.channels, frames=f.frames,
                     subtype=f.subtype, bit_depth=_BIT_DEPTH.get(f.subtype, 0))


def _check_duration(info: AudioInfo, max_duration_s: float | None, label: str) -> None:
    if max_duration_s is not None and info.duration_s > max_duration_s:
        raise AudioError(label, f"too long: {info.duration_s:.1f} s > limit {max_duration_s:g} s")


def decode(source: Source, name: str | None = None,
           max_duration_s: float | None = None) -> tuple[np.ndarray, AudioInfo]:
    """Decode every sample of ``source``.

    ``max_duration_s`` rejects over-long input from its header, before decoding it, so a
    one-hour upload costs a header read, not a full decode.
    Returns:
        samples: float32 array (frames, channels), full-scale ±1 for integer formats.
        info: the header facts.
    Raises:
        AudioError: empty, unreadable, truncated, too long, zero-length or non-finite audio.
    """
    label = _name(source, name)
    data = _raw_bytes(source, label)
    wav = _check_riff(data, label)
    plain = _plain_info(wav) if wav else None
    if plain is not None:
        _check_duration(plain, max_duration_s, label)
        samples, info = _read_plain(data, wav, plain), plain
    else:
        with _open(data, label) as f:
            info = _info(f)
            _check_duration(info, max_duration_s, label)
            try:
                samples = f.read(dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as err:
                raise AudioError(label, f"decoding failed ({err})") from err
    if samples.shape[0] == 0:
        raise AudioError(label, "zero-length audio (no samples)")
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise NonFiniteAudio(label, f"{bad} non-finite samples (NaN or inf)")
    return samples, info


CLIP_LEVEL = 0.999  # |sample| at or above this (full scale 1.0) counts as clipped
SILENCE_RMS = 1e-3  # a 20 ms frame below -60 dBFS counts as silent


def signal_stats(samples: np.ndarray, sample_rate: int) -> dict[str, float]:
    """Level facts of decoded (frames, channels) samples: peak, RMS, clipped and silent fractions.

    The manifest records them for every file (validate_raw) and the service's drift guard checks
    an upload's against the training files'.
    """
    mono = to_mono(samples)
    frame = max(1, sample_rate // 50)
    usable = len(mono) // frame * frame
    frames = mono[:usable].reshape(-1, frame)
    # a frame is silent when its mean square is below SILENCE_RMS ** 2: no square roots needed
    frame_energy = np.einsum("ij,ij->i", frames, frames) if usable else np.zeros(1)
    flat = samples.reshape(-1)
    peak = float(max(flat.max(), -flat.min()))
    clipped = np.count_nonzero(np.abs(flat) >= CLIP_LEVEL) if peak >= CLIP_LEVEL else 0  # usually none
    return {"peak": peak, "rms": float(np.sqrt(np.dot(flat, flat) / flat.size)),
            "clipping_fraction": clipped / flat.size,
            "silence_fraction": float(np.count_nonzero(frame_energy < SILENCE_RMS ** 2 * frame) / len(frame_energy))}


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Downmix (frames, channels) to (frames,) by averaging channels."""
    return samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]


def resampled_length(frames: int, orig_sr: int, target_sr: int) -> int:
    """Samples that :func:`resample` returns for ``frames`` samples at ``orig_sr``."""
    return frames if orig_sr == target_sr else int(np.ceil(frames * target_sr / orig_sr))


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample a mono float32 wave; a no-op copy-free return when the rates match."""
    if orig_sr == target_sr:
        return wave
    # librosa.resample(res_type="soxr_hq") without its per-axis loop: the same soxr call, then
    # its length, ceil(n * ratio) (soxr may give one sample less), so features match librosa's.
    out = soxr.resample(wave, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)
    n = resampled_length(len(wave), orig_sr, target_sr)
    return out[:n] if len(out) >= n else np.pad(out, (0, n - len(out)))


def load(source: Source, sample_rate: int, name: str | None = None,
         max_duration_s: float | None = None) -> np.ndarray:
    """Decode (see :func:`decode`), downmix and resample to a mono float32 wave at ``sample_rate``."""
    samples, info = decode(source, name, max_duration_s)
    return resample(to_mono(samples), info.sample_rate, sample_rate).astype(np.float32, copy=False)


def write_wav(path: Path | BinaryIO, wave: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Write a wave deterministically (same samples → same bytes)."""
    sf.write(path, wave, sample_rate, subtype=subtype, format="WAV")
