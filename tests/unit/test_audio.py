"""pipeline.audio: every format decodes to the same float32 samples; every bad file gets a named error."""
from __future__ import annotations

import io
import struct
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline import audio
from pipeline.audio import AudioError, NonFiniteAudio

SR = 8000


def wav_bytes(wave: np.ndarray, sample_rate: int = SR, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, subtype=subtype, format="WAV")
    return buf.getvalue()


def grid_wave(n: int = 800) -> np.ndarray:
    """A wave on the 8-bit grid (k/128, k in [-128, 127]): exactly representable in every format."""
    k = np.round(127.0 * np.sin(2 * np.pi * 440 * np.arange(n) / SR)).astype(int)
    k[:4] = [-128, 127, 0, -1]  # both extremes of full scale
    return (k / 128.0).astype(np.float32)


def smooth_wave(n: int = 800) -> np.ndarray:
    t = np.arange(n) / SR
    return (0.6 * np.sin(2 * np.pi * 300 * t) + 0.3 * np.sin(2 * np.pi * 1234.5 * t)).astype(np.float32)


FORMATS = [("PCM_U8", 8), ("PCM_16", 16), ("PCM_24", 24), ("PCM_32", 32), ("FLOAT", 32), ("DOUBLE", 64)]


@pytest.mark.parametrize(("subtype", "bits"), FORMATS)
def test_every_bit_depth_decodes_to_the_same_float32_values(subtype: str, bits: int) -> None:
    source = grid_wave()
    samples, info = audio.decode(wav_bytes(source, subtype=subtype), name="grid.wav")
    assert samples.dtype == np.float32
    assert samples.shape == (len(source), 1)
    assert (info.sample_rate, info.channels, info.frames) == (SR, 1, len(source))
    assert (info.subtype, info.bit_depth) == (subtype, bits)
    assert np.abs(samples).max() <= 1.0
    np.testing.assert_allclose(samples[:, 0], source, atol=1e-4, rtol=0)
    assert samples[0, 0] == -1.0  # full-scale negative maps to exactly -1


@pytest.mark.parametrize(("subtype", "bits"), FORMATS)
def test_off_grid_signal_is_within_one_quantization_step(subtype: str, bits: int) -> None:
    source = smooth_wave()
    samples, _ = audio.decode(wav_bytes(source, subtype=subtype))
    step = 2.0 ** -(bits - 1) if subtype.startswith("PCM") else 1e-7
    np.testing.assert_allclose(samples[:, 0], source, atol=max(step, 1e-7), rtol=0)


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
def test_numpy_read_of_plain_wavs_equals_libsndfile(subtype: str, channels: int) -> None:
    """16-bit PCM and float WAVs skip libsndfile (cheaper per upload): same samples, bit for bit,
    full-scale extremes and trailing chunks included."""
    wave = np.random.default_rng(0).uniform(-1, 1, (1001, channels)).astype(np.float32)
    wave[:2, 0] = [-1.0, 1.0]
    data = wav_bytes(wave, subtype=subtype) + b"LIST" + struct.pack("<I", 4) + b"INFO"
    expected, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    with sf.SoundFile(io.BytesIO(data)) as f:
        header = audio.AudioInfo(f.samplerate, f.channels, f.frames, f.subtype, 16 if subtype == "PCM_16" else 32)
    samples, info = audio.decode(data)
    assert samples.dtype == np.float32 and samples.flags.c_contiguous and samples.flags.writeable
    np.testing.assert_array_equal(samples, expected)
    assert info == header == audio.probe(data)


def test_decode_reads_a_path_like_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.wav"
    path.write_bytes(wav_bytes(smooth_wave()))
    from_path, info = audio.decode(path)
    from_bytes, _ = audio.decode(path.read_bytes())
    np.testing.assert_array_equal(from_path, from_bytes)
    assert audio.probe(path) == info
    assert info.duration_s == pytest.approx(800 / SR)


def test_stereo_is_downmixed_to_the_channel_mean() -> None:
    left, right = smooth_wave(), grid_wave()
    data = wav_bytes(np.stack([left, right], axis=1), subtype="FLOAT")
    samples, info = audio.decode(data)
    assert info.channels == 2 and samples.shape == (800, 2)
    mono = audio.load(data, SR)
    assert mono.shape == (800,) and mono.dtype == np.float32
    np.testing.assert_allclose(mono, (left + right) / 2, atol=1e-6)
    np.testing.assert_allclose(audio.to_mono(samples), (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize(("n", "orig", "target"), [(8000, 8000, 16000), (8001, 8000, 16000),
                                                    (16000, 16000, 8000), (12345, 44100, 16000),
                                                    (16439, 22050, 16000)])  # soxr alone: 1 short
def test_resample_length(n: int, orig: int, target: int) -> None:
    t = np.arange(n) / orig
    wave = np.sin(2 * np.pi * 200 * t).astype(np.float32)
    data = wav_bytes(wave, sample_rate=orig, subtype="FLOAT")
    out = audio.load(data, target)
    assert out.dtype == np.float32
    assert len(out) == math.ceil(n * target / orig)
    # a 200 Hz tone survives resampling: same RMS (away from the edges)
    mid = out[len(out) // 4: 3 * len(out) // 4]
    assert np.sqrt(np.mean(mid ** 2)) == pytest.approx(np.sqrt(0.5), rel=0.02)


@pytest.mark.parametrize(("n", "orig", "target"), [(16439, 22050, 16000), (7, 8000, 16000), (9600, 96000, 16000)])
def test_resample_equals_librosa_soxr_hq(n: int, orig: int, target: int) -> None:
    import librosa

    wave = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    expected = librosa.resample(wave, orig_sr=orig, target_sr=target, res_type="soxr_hq")
    np.testing.assert_array_equal(audio.resample(wave, orig, target), expected)


def test_resample_same_rate_is_identity() -> None:
    wave = smooth_wave()
    assert audio.resample(wave, SR, SR) is wave


def _error(source, **kwargs) -> AudioError:
    with pytest.raises(AudioError) as err:
        audio.decode(source, **kwargs)
    return err.value


def test_empty_bytes() -> None:
    err = _error(b"", name="empty.wav")
    assert str(err).startswith("empty.wav: ") and "empty" in err.problem


def test_empty_file_named_by_path(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    assert str(path) in str(_error(path))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.wav"
    err = _error(path)
    assert str(path) in str(err) and "cannot read" in err.problem


def test_non_audio_bytes(tmp_path: Path) -> None:
    path = tmp_path / "text.wav"
    path.write_text("this is a text file that pretends to be a wav\n" * 20)
    err = _error(path)
    assert str(path) in str(err) and "not a decodable audio file" in err.problem


@pytest.mark.parametrize("keep", [-1, -100, 44, 30])
def test_truncated_wav(keep: int) -> None:
    data = wav_bytes(smooth_wave())
    err = _error(data[:keep], name="cut.wav")
    assert str(err).startswith("cut.wav: ")
    assert "truncated" in err.problem or "no data chunk" in err.problem


def test_truncated_wav_is_rejected_by_probe_too() -> None:
    with pytest.raises(AudioError, match="truncated"):
        audio.probe(wav_bytes(smooth_wave())[:-2], name="cut.wav")


def test_nan_float_wav() -> None:
    wave = smooth_wave()
    wave[100:110] = np.nan
    wave[200] = np.inf
    with pytest.raises(NonFiniteAudio, match=r"nan\.wav: 11 non-finite samples") as err:
        audio.decode(wav_bytes(wave, subtype="FLOAT"), name="nan.wav")
    assert isinstance(err.value, AudioError)


def test_zero_length_wav() -> None:
    data = wav_bytes(np.zeros((0, 1), np.float32))
    assert audio.probe(data).frames == 0
    err = _error(data, name="zero.wav")
    assert str(err).startswith("zero.wav: ") and "zero-length" in err.problem


def test_max_duration_rejects_long_files_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = wav_bytes(np.zeros(3 * SR, np.float32))  # 3 s

    def no_read(*args, **kwargs):
        raise AssertionError("no sample may be read for an over-long file")

    monkeypatch.setattr(audio.sf.SoundFile, "read", no_read)
    with pytest.raises(AudioError, match=r"long\.wav: too long: 3\.0 s > limit 2 s"):
        audio.load(data, SR, name="long.wav", max_duration_s=2.0)


def test_max_duration_accepts_files_within_the_limit() -> None:
    data = wav_bytes(smooth_wave(2 * SR))
    assert len(audio.load(data, SR, max_duration_s=2.0)) == 2 * SR


def test_write_wav_is_deterministic(tmp_path: Path) -> None:
    wave = smooth_wave()
    audio.write_wav(tmp_path / "a.wav", wave, SR)
    audio.write_wav(tmp_path / "b.wav", wave, SR)
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()


# --- WAV headers that contradict themselves ---------------------------------------------------------

def _with_fmt(data: bytes, **fields: int) -> bytes:
    """``data`` (a WAV from soundfile) with fields of its fmt chunk replaced."""
    pos = data.index(b"fmt ") + 8
    names = ("tag", "channels", "rate", "byte_rate", "align", "bits")
    values = dict(zip(names, struct.unpack("<HHIIHH", data[pos:pos + 16])))
    values.update(fields)
    return data[:pos] + struct.pack("<HHIIHH", *(values[n] for n in names)) + data[pos + 16:]


@pytest.mark.parametrize(("fields", "words"), [
    ({"bits": 12, "align": 1}, "12 bits per sample"),
    ({"align": 3}, "block align 3 bytes"),
    ({"byte_rate": 1234}, "byte rate 1234"),
    ({"tag": 0x0055}, "unsupported WAV codec (format tag 0x0055)"),
    ({"channels": 0}, "0 channels"),
])
def test_inconsistent_fmt_chunks_are_named(fields: dict, words: str) -> None:
    err = _error(_with_fmt(wav_bytes(smooth_wave()), **fields), name="odd.wav")
    assert str(err).startswith("odd.wav: ") and words in err.problem
