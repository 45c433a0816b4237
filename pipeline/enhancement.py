"""Speech-enhancement scores of one utterance, and the classical enhancer to compare against.

A speech-enhancement model maps a noisy recording to an estimate of its clean source; it is
judged on (clean, noisy, enhanced) triples of the same length at the same rate:

- SI-SNR (dB): energy of the estimate's projection on the clean reference over the energy of the
  rest, both zero-mean, so a gain or a DC offset on the estimate costs nothing;
- PESQ (ITU-T P.862.2 wide band at 16 kHz, P.862 narrow band at 8 kHz): predicted listening
  quality, MOS-LQO in about [1.0, 4.64];
- STOI (pystoi): short-time objective intelligibility, in about [0, 1].

``spectral_gating`` (noisereduce) is the classical baseline a learned enhancer has to beat;
``score_utterances`` and ``summarise`` are what the evaluate stage reports for task enhance.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import noisereduce
import numpy as np
import pandas as pd
import torch
from pesq import PesqError, pesq
from pystoi import stoi

from pipeline.stats import bootstrap_ci, wilcoxon_pairs

# Guards the logarithm and the divisions against all-zero signals (digital silence in or out).
EPS = 1e-8
# P.862 is defined at these two rates only; anything else must be resampled by the caller.
PESQ_MODES = {16000: "wb", 8000: "nb"}


def _wave(x: Any, name: str) -> np.ndarray:
    """A 1-D numpy or torch signal as a float64 numpy array (float64: the sums run over 1e5 samples)."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D signal, got shape {arr.shape}")
    return arr.astype(np.float64)


def _same_length(**waves: np.ndarray) -> None:
    lengths = {name: len(w) for name, w in waves.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"signals differ in length (samples): {lengths}")


def si_snr(estimate: Any, reference: Any) -> float:
    """Scale-invariant SNR (dB) of ``estimate`` against ``reference``, both (T,) numpy or torch.

    ``10 log10(|s|^2 / |e|^2)`` with ``s`` the projection of the zero-mean estimate on the
    zero-mean reference and ``e = estimate - s``. A silent estimate or reference scores the floor,
    ``10 log10(EPS)`` = -80 dB, instead of NaN.
    """
    est, ref = _wave(estimate, "estimate"), _wave(reference, "reference")
    _same_length(estimate=est, reference=ref)
    est, ref = est - est.mean(), ref - ref.mean()
    target = (est @ ref) / (ref @ ref + EPS) * ref
    residual = est - target
    return float(10 * np.log10((target @ target) / (residual @ residual + EPS) + EPS))


def si_snr_torch(estimate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Batched, differentiable :func:`si_snr`: (B, T) and (B, T) give (B,) dB.

    Its negative mean is the usual training loss of a waveform or mask enhancer.
    """
    if estimate.shape != reference.shape or estimate.dim() != 2:
        raise ValueError(f"estimate and reference must both be (B, T), got {tuple(estimate.shape)} "
                         f"and {tuple(reference.shape)}")
    est = estimate - estimate.mean(dim=1, keepdim=True)
    ref = reference - reference.mean(dim=1, keepdim=True)
    scale = (est * ref).sum(dim=1, keepdim=True) / (ref.pow(2).sum(dim=1, keepdim=True) + EPS)
    target = scale * ref
    residual = est - target
    return 10 * torch.log10(target.pow(2).sum(dim=1) / (residual.pow(2).sum(dim=1) + EPS) + EPS)


def si_snr_improvement(enhanced: Any, noisy: Any, clean: Any) -> float:
    """SI-SNRi (dB): what enhancement added, ``si_snr(enhanced, clean) - si_snr(noisy, clean)``."""
    return si_snr(enhanced, clean) - si_snr(noisy, clean)


def pesq_score(reference: Any, degraded: Any, rate: int) -> float:
    """PESQ MOS-LQO of ``degraded`` against ``reference`` (both (T,)): wide band at 16 kHz,
    narrow band at 8 kHz.

    Raises:
        ValueError: any other rate (named in the message), or signals of different lengths.
        pesq.NoUtterancesError: the reference holds no speech PESQ can find.
    """
    if rate not in PESQ_MODES:
        raise ValueError(f"PESQ is defined at 16000 Hz (wide band) or 8000 Hz (narrow band), "
                         f"got {rate} Hz: resample first")
    ref, deg = _wave(reference, "reference"), _wave(degraded, "degraded")
    _same_length(reference=ref, degraded=deg)
    return float(pesq(rate, ref, deg, PESQ_MODES[rate]))


def stoi_score(reference: Any, degraded: Any, rate: int) -> float:
    """STOI of ``degraded`` against ``reference`` (both (T,) at ``rate`` Hz; pystoi resamples to 10 kHz).

    NaN when the reference has too little speech for STOI's 384 ms analysis window (pystoi
    warns and returns 1e-5 then, which would read as unintelligible).
    """
    ref, deg = _wave(reference, "reference"), _wave(degraded, "degraded")
    _same_length(reference=ref, degraded=deg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = float(stoi(ref, deg, rate, extended=False))
    return float("nan") if any("Not enough STFT frames" in str(w.message) for w in caught) else score


def _pesq_or_nan(reference: Any, degraded: Any, rate: int) -> float:
    """PESQ, or NaN for an utterance in which PESQ finds no speech (a per-utterance table keeps
    the row; the summaries count the scored utterances)."""
    try:
        return pesq_score(reference, degraded, rate)
    except PesqError:
        return float("nan")


def utterance_metrics(clean: Any, noisy: Any, enhanced: Any, rate: int) -> dict[str, float]:
    """Every score of one (clean, noisy, enhanced) triple, each (T,) at ``rate`` Hz.

    Returns:
        si_snr, si_snr_i (dB); pesq, pesq_noisy; stoi, stoi_noisy: the enhanced and the noisy
        input each scored against ``clean``, so a report can show what enhancement changed.
    """
    return {"si_snr": si_snr(enhanced, clean), "si_snr_i": si_snr_improvement(enhanced, noisy, clean),
            "pesq": _pesq_or_nan(clean, enhanced, rate), "pesq_noisy": _pesq_or_nan(clean, noisy, rate),
            "stoi": stoi_score(clean, enhanced, rate), "stoi_noisy": stoi_score(clean, noisy, rate)}


def spectral_gating(noisy: Any, rate: int) -> np.ndarray:
    """The classical reference enhancer: noisereduce's non-stationary spectral gating.

    Args:
        noisy: (T,) numpy or torch signal at ``rate`` Hz.
    Returns:
        (T,) float32: the same length as the input, so it scores against the same reference.
    """
    wave = _wave(noisy, "noisy")
    # n_jobs=1: the library's default, stated because the stages share few cores; no torch
    # backend, so the result does not depend on the device.
    out = noisereduce.reduce_noise(y=wave, sr=rate, stationary=False, n_jobs=1, use_torch=False)
    out = np.asarray(out, dtype=np.float32)
    return out[:len(wave)] if len(out) >= len(wave) else np.pad(out, (0, len(wave) - len(out)))


METRICS = ("si_snr", "si_snr_i", "pesq", "stoi")  # per utterance, higher is better for each
REFERENCE = "ref_"  # column prefix of the spectral-gating reference's scores


def score_utterances(rows: pd.DataFrame, load: Callable[[str], np.ndarray], rate: int,
                     enhance: Callable[[np.ndarray], np.ndarray]) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Score the enhancer and the spectral-gating reference on every (noisy ``path``, clean ``pair``) row.

    ``load(rel)`` gives a (T,) wave at ``rate``; ``enhance(noisy)`` the enhanced (T,) wave. Returns
    one row per utterance, sorted by path (the columns of ``reports/predictions.csv``), and the
    enhanced waves by path (evaluate keeps a few as samples).
    """
    records, enhanced = [], {}
    for row in rows.sort_values("path").itertuples(index=False):
        noisy, clean = load(row.path), load(row.pair)
        enhanced[row.path] = out = enhance(noisy)
        model = utterance_metrics(clean, noisy, out, rate)
        ref = utterance_metrics(clean, noisy, spectral_gating(noisy, rate), rate)
        records.append({"path": row.path, "pair": row.pair, "group": row.group, "snr_db": row.snr_db,
                        "noise": row.noise, **{m: model[m] for m in METRICS},
                        "si_snr_noisy": si_snr(noisy, clean), "pesq_noisy": model["pesq_noisy"],
                        "stoi_noisy": model["stoi_noisy"], **{REFERENCE + m: ref[m] for m in METRICS}})
    return pd.DataFrame(records), enhanced


def describe(values: np.ndarray, n_resamples: int, seed: int) -> dict[str, Any]:
    """Mean, std and the 95% percentile-bootstrap CI of the mean of (n,) ``values``; NaN (an
    utterance the metric cannot score) left out, ``n`` counts the scored ones."""
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    mean, low, high = bootstrap_ci(lambda v, _: float(np.mean(v)), values, values, n_resamples=n_resamples, seed=seed)
    return {"mean": mean, "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "ci95": [low, high], "n": int(len(values))}


def summarise(scores: pd.DataFrame, n_resamples: int, seed: int) -> dict[str, Any]:
    """The enhancer, the reference and the noisy input over ``scores`` (``score_utterances``'
    table): per metric mean/std/CI; the model minus the reference and a paired Wilcoxon of the two."""
    out: dict[str, Any] = {
        "model": {m: describe(scores[m].to_numpy(), n_resamples, seed) for m in METRICS},
        "baseline": {m: describe(scores[REFERENCE + m].to_numpy(), n_resamples, seed) for m in METRICS},
        "noisy": {m: describe(scores[f"{m}_noisy"].to_numpy(), n_resamples, seed) for m in ("si_snr", "pesq", "stoi")}}
    out["model_minus_baseline"] = {m: float((scores[m] - scores[REFERENCE + m]).mean()) for m in METRICS}
    tests = {}
    for m in METRICS:
        both = scores[[m, REFERENCE + m]].dropna()  # an utterance unscored by either is left out
        # sorted names: a = "model", b = "ref", so the test is on ref - model
        row = wilcoxon_pairs({"model": both[m].to_numpy(), "ref": both[REFERENCE + m].to_numpy()}).iloc[0]
        tests[m] = {"statistic": float(row["statistic"]), "p_value": float(row["p_value"]), "n": int(row["n"])}
    out["wilcoxon_vs_baseline"] = tests
    return out


def by_snr(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean scores per stated input SNR (dB) of the model, the reference and the noisy input
    (long format: snr_db, enhancer, metric columns), the table behind the SNR plot."""
    parts = []
    for name, prefix in (("model", ""), ("spectral_gating", REFERENCE)):
        part = scores.groupby("snr_db")[[prefix + m for m in METRICS]].mean()
        parts.append(part.set_axis(list(METRICS), axis=1).assign(enhancer=name))
    noisy = scores.groupby("snr_db")[["si_snr_noisy", "pesq_noisy", "stoi_noisy"]].mean()
    parts.append(noisy.set_axis(["si_snr", "pesq", "stoi"], axis=1).assign(si_snr_i=0.0, enhancer="noisy"))
    return pd.concat(parts).reset_index()[["snr_db", "enhancer", *METRICS]]
