"""pipeline.compare_enhance on hand-made per-utterance tables: Wilcoxon p-values, Bonferroni over
pairs x metrics, the spectral-gating reference row, and the refusals (MLflow download path:
tests/integration/test_compare.py)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipeline.compare_enhance import REFERENCE, compare_tables

N_UTTERANCES = 24
METRICS = ["si_snr_i", "pesq", "stoi"]


def enhance_predictions(si_snr_i: np.ndarray) -> pd.DataFrame:
    """A predictions.csv as the enhance evaluate stage writes it; pesq and stoi follow si_snr_i so a
    variant better in one is better in all. The reference (ref_*) is the same for every variant,
    as on the same data."""
    n = len(si_snr_i)
    noisy = np.linspace(-5, 10, n)
    ref_i = 0.5 + 0.1 * np.sin(np.arange(n))
    return pd.DataFrame({
        "path": [f"noisy/spk{i // 4:02d}_{i:02d}.wav" for i in range(n)],
        "pair": [f"clean/{i:02d}.wav" for i in range(n)],
        "group": [f"spk{i // 4:02d}" for i in range(n)], "snr_db": noisy, "noise": "babble",
        "si_snr": noisy + si_snr_i, "si_snr_i": si_snr_i,
        "pesq": 1.5 + 0.1 * si_snr_i, "stoi": 0.7 + 0.01 * si_snr_i,
        "si_snr_noisy": noisy, "pesq_noisy": np.full(n, 1.3), "stoi_noisy": np.full(n, 0.65),
        "ref_si_snr": noisy + ref_i, "ref_si_snr_i": ref_i,
        "ref_pesq": 1.5 + 0.1 * ref_i, "ref_stoi": 0.7 + 0.01 * ref_i})


def variant_gains() -> dict[str, np.ndarray]:
    """SI-SNRi per utterance: `wide` clearly above `unet`; `unet-twin` = unet with small symmetric
    noise (no real difference); all far above the reference's ~0.5 dB."""
    rng = np.random.default_rng(0)
    unet = rng.uniform(6, 10, N_UTTERANCES)
    wide = unet + rng.uniform(1.0, 2.0, N_UTTERANCES)
    twin = unet + np.where(np.arange(N_UTTERANCES) % 2 == 0, 1, -1) * rng.uniform(0.01, 0.05, N_UTTERANCES)
    return {"unet": unet, "unet-twin": twin, "wide": wide}


def one_seed(names: list[str]) -> dict[str, tuple[str, int]]:
    return {n: (n, 0) for n in names}


def test_table_pairs_bonferroni_and_reference_row() -> None:
    gains = variant_gains()
    tables = {name: enhance_predictions(g) for name, g in gains.items()}
    variants, pairs = compare_tables(tables, one_seed(list(gains)), METRICS)

    assert list(variants["variant"]) == ["unet", "unet-twin", "wide", REFERENCE]
    rows = variants.set_index("variant")
    ref = tables["unet"]
    assert rows.loc[REFERENCE, "si_snr_i"] == pytest.approx(ref["ref_si_snr_i"].mean())
    assert rows.loc[REFERENCE, "pesq"] == pytest.approx(ref["ref_pesq"].mean())
    assert rows.loc["wide", "stoi_std"] == pytest.approx(np.std(0.7 + 0.01 * gains["wide"], ddof=1))
    for name in gains:
        assert rows.loc[name, "si_snr_i_ci_low"] < rows.loc[name, "si_snr_i"] < rows.loc[name, "si_snr_i_ci_high"]
    assert (rows["n"] == N_UTTERANCES).all()

    # 4 rows -> 6 pairs, x 3 metrics = 18 tests in one Bonferroni family
    assert len(pairs) == 18 and list(pairs["metric"].unique()) == METRICS
    np.testing.assert_allclose(pairs["p_bonferroni"], np.minimum(1.0, 18 * pairs["p_value"]))
    by = pairs.set_index(["metric", "a", "b"])
    expected = stats.wilcoxon(gains["wide"], gains["unet"]).pvalue  # differences b - a
    assert by.loc[("si_snr_i", "unet", "wide"), "p_value"] == pytest.approx(expected)
    assert by.loc[("si_snr_i", "unet", "wide"), "mean_diff"] == pytest.approx((gains["wide"] - gains["unet"]).mean())
    twin_p = stats.wilcoxon(gains["unet-twin"], gains["unet"]).pvalue
    assert by.loc[("si_snr_i", "unet", "unet-twin"), "p_bonferroni"] == pytest.approx(min(1.0, 18 * twin_p))
    for m in METRICS:
        assert bool(by.loc[(m, "unet", "wide"), "significant"]) is True
        assert bool(by.loc[(m, "unet-twin", "wide"), "significant"]) is True
        assert bool(by.loc[(m, "unet", "unet-twin"), "significant"]) is False
        for name in gains:  # every variant against the classical reference ('s' < 'u'/'w': reference is a)
            assert bool(by.loc[(m, REFERENCE, name), "significant"]) is True
            assert by.loc[(m, REFERENCE, name), "mean_diff"] > 0


def test_a_difference_significant_alone_is_not_after_correction() -> None:
    """p x 6 pairs < 0.05 but p x 18 tests is not: the family is every pair of every metric."""
    base = np.random.default_rng(3).uniform(6, 10, 14)
    nudged = base + np.r_[np.linspace(0.2, 0.4, 12), -0.25, -0.24]  # 12 of 14 up: exact p = 0.0040
    tables = {"a": enhance_predictions(base), "b": enhance_predictions(nudged), "c": enhance_predictions(base)}
    _, pairs = compare_tables(tables, one_seed(["a", "b", "c"]), METRICS)
    row = pairs.set_index(["metric", "a", "b"]).loc[("si_snr_i", "a", "b")]
    assert row["p_value"] * 6 < 0.05 <= row["p_bonferroni"] and not row["significant"]


def test_mismatched_utterance_sets_are_refused() -> None:
    gains = variant_gains()
    tables = {name: enhance_predictions(g) for name, g in gains.items()}
    tables["wide"] = tables["wide"].iloc[:-2]
    with pytest.raises(ValueError, match=r"'unet' \(24 utterances\) and 'wide' \(22\).*different test utterances"):
        compare_tables(tables, one_seed(list(gains)), METRICS)


def test_a_reference_that_differs_means_different_data() -> None:
    gains = variant_gains()
    tables = {name: enhance_predictions(g) for name, g in gains.items()}
    tables["wide"]["ref_pesq"] += 0.2
    with pytest.raises(ValueError, match="reference \\(ref_pesq\\) differs between experiments 'unet' and 'wide'"):
        compare_tables(tables, one_seed(list(gains)), METRICS)


def test_a_classify_table_is_named() -> None:
    tables = {"unet": enhance_predictions(variant_gains()["unet"]),
              "cnn": pd.DataFrame({"path": ["a.wav"], "group": ["g"], "label": ["good"], "kept": [True]})}
    with pytest.raises(ValueError, match="experiment 'cnn': predictions.csv lacks column.*task enhance"):
        compare_tables(tables, one_seed(["unet", "cnn"]), METRICS)


def test_unscored_utterances_leave_only_that_metric() -> None:
    gains = variant_gains()
    tables = {name: enhance_predictions(g) for name, g in gains.items()}
    tables["wide"].loc[3, "pesq"] = np.nan  # PESQ found no speech in one utterance
    variants, pairs = compare_tables(tables, one_seed(list(gains)), METRICS)
    n = pairs.groupby("metric")["n"].unique()
    assert list(n["pesq"]) == [N_UTTERANCES - 1] and list(n["stoi"]) == [N_UTTERANCES]
    assert variants.set_index("variant").loc["wide", "pesq"] == pytest.approx(
        np.delete(1.5 + 0.1 * gains["wide"], 3).mean())


def test_seeds_pool_per_utterance_and_show_the_spread() -> None:
    rng = np.random.default_rng(1)
    unet = {s: rng.uniform(6, 10, N_UTTERANCES) for s in range(2)}
    wide = {s: unet[s] + 1.0 + 0.5 * s for s in range(2)}  # seed 1 gains more
    tables = {f"{v}-s{s}": enhance_predictions(g[s]) for v, g in (("unet", unet), ("wide", wide)) for s in range(2)}
    names = {f"{v}-s{s}": (v, s) for v in ("unet", "wide") for s in range(2)}
    variants, pairs = compare_tables(tables, names, ["si_snr_i"])
    rows = variants.set_index("variant")
    assert rows.loc["wide", "seeds"] == 2 and rows.loc["wide", "n"] == 2 * N_UTTERANCES
    assert rows.loc["wide", "si_snr_i_seed_sd"] == pytest.approx(np.std([wide[0].mean(), wide[1].mean()], ddof=1))
    assert rows.loc[REFERENCE, "n"] == N_UTTERANCES and pd.isna(rows.loc[REFERENCE, "seeds"])
    by = pairs.set_index(["a", "b"])
    assert by.loc[("unet", "wide"), "n"] == 2 * N_UTTERANCES  # one pair per (seed, utterance)
    assert by.loc[("unet", "wide"), "seed_sd"] == pytest.approx(np.std([1.0, 1.5], ddof=1))
    pooled = np.concatenate([wide[s] - unet[s] for s in range(2)])
    assert by.loc[("unet", "wide"), "p_value"] == pytest.approx(stats.wilcoxon(pooled).pvalue)


def test_unknown_metric_is_named() -> None:
    tables = {name: enhance_predictions(g) for name, g in variant_gains().items()}
    with pytest.raises(ValueError, match=r"unknown enhancement metric\(s\) \['accuracy'\]"):
        compare_tables(tables, one_seed(list(tables)), ["accuracy"])


def test_groups_level_pairs_speaker_means() -> None:
    tables = {name: enhance_predictions(g) for name, g in variant_gains().items()}
    variants, pairs = compare_tables(tables, one_seed(list(tables)), ["si_snr_i"], level="groups")
    assert (pairs["n"] == N_UTTERANCES // 4).all() and (variants["n"] == N_UTTERANCES // 4).all()
