"""pipeline.stages.register.gate (the champion gate) on hand-made prediction tables, and provenance().

McNemar p-values are exact two-sided binomial tails: with d discordant files all favouring
the challenger, p = 2 / 2**d (10 -> 0.001953125, 3 -> 0.25).
"""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.gate import baseline_gate, enhance_baseline_gate, enhance_champion_gate
from pipeline.gate import champion_gate as gate
from pipeline.stages import register
from pipeline.stages.register import RegisterParams, provenance


def labels(n: int) -> list[str]:
    return ["good" if i % 2 == 0 else "bad" for i in range(n)]


def flip(label: str) -> str:
    return "bad" if label == "good" else "good"


def challenger_table(truth: list[str], wrong: set[int] = frozenset(), not_kept: set[int] = frozenset(),
                     prefix: str = "f") -> pd.DataFrame:
    """A predictions.csv as the evaluate stage writes it (columns used by the gate and more)."""
    predicted = [flip(t) if i in wrong else t for i, t in enumerate(truth)]
    return pd.DataFrame({"path": [f"{prefix}{i:03d}.wav" for i in range(len(truth))],
                         "group": [f"g{i // 4}" for i in range(len(truth))], "label": truth,
                         "predicted": predicted, "kept": [i not in not_kept for i in range(len(truth))],
                         "correct": [p == t for p, t in zip(predicted, truth)]})


def champion_table(truth: list[str], wrong: set[int] = frozenset(), prefix: str = "f") -> pd.DataFrame:
    """What register downloads from the champion's run: path, predicted, correct."""
    return challenger_table(truth, wrong, prefix=prefix)[["path", "predicted", "correct"]]


def test_no_champion_moves() -> None:
    decision = gate(challenger_table(labels(4), wrong={0, 1}), None, RegisterParams())
    assert decision == {"move": True, "why": "no champion yet"}


def test_significantly_better_challenger_moves_with_exact_mcnemar_p() -> None:
    truth = labels(20)
    # champion wrong on files 0..9 (5 good, 5 bad), the challenger right everywhere
    decision = gate(challenger_table(truth), champion_table(truth, wrong=set(range(10))), RegisterParams())
    assert decision["move"] is True
    assert decision["why"] == "challenger is significantly better"
    assert decision["test"] == "mcnemar"
    assert decision["p_value"] == pytest.approx(2 / 2**10) == pytest.approx(0.001953125)
    assert decision["discordant"] == [0, 10]  # [champion-only right, challenger-only right]
    assert decision["metric"] == "balanced_accuracy"
    assert decision["challenger"] == 1.0 and decision["champion"] == 0.5  # recall 5/10 per class
    assert decision["improvement"] == pytest.approx(0.5)
    assert decision["n_files"] == 20


def test_worse_challenger_does_not_move() -> None:
    truth = labels(20)
    decision = gate(challenger_table(truth, wrong=set(range(10))), champion_table(truth), RegisterParams())
    assert decision["move"] is False
    assert decision["discordant"] == [10, 0]
    assert decision["improvement"] == pytest.approx(-0.5)
    assert decision["why"].startswith("not better enough: improvement -0.5000")


def test_better_but_not_significant_does_not_move() -> None:
    truth = labels(20)
    # champion wrong on files 0, 1, 2 (good, bad, good): recall good 8/10, bad 9/10
    decision = gate(challenger_table(truth), champion_table(truth, wrong={0, 1, 2}), RegisterParams())
    assert decision["champion"] == pytest.approx(0.85)
    assert decision["p_value"] == pytest.approx(0.25)
    assert decision["move"] is False
    assert decision["why"] == "not better enough: improvement +0.1500 (min 0.0), p=0.25 (alpha 0.05)"
    # a looser alpha lets the same evidence through
    assert gate(challenger_table(truth), champion_table(truth, wrong={0, 1, 2}),
                RegisterParams(alpha=0.3))["move"] is True


def test_equal_models_do_not_move() -> None:
    truth = labels(20)
    decision = gate(challenger_table(truth, wrong={3}), champion_table(truth, wrong={3}), RegisterParams())
    assert decision["move"] is False
    assert decision["improvement"] == 0.0 and decision["p_value"] == 1.0
    assert decision["discordant"] == [0, 0]


@pytest.mark.parametrize(("min_improvement", "moves"), [
    (0.2, False),
    (0.1, True),
    (0.05, True),
])
def test_min_improvement_blocks_small_gains(min_improvement: float, moves: bool) -> None:
    truth = labels(100)
    # accuracy 1.0 vs 0.9, McNemar p = 2/2**10: significant, but only a 0.1 gain
    decision = gate(challenger_table(truth), champion_table(truth, wrong=set(range(0, 100, 10))),
                    RegisterParams(metric="accuracy", min_improvement=min_improvement))
    assert decision["improvement"] == pytest.approx(0.1)
    assert decision["p_value"] == pytest.approx(0.001953125)
    assert decision["move"] is moves
    if not moves:
        assert f"(min {min_improvement})" in decision["why"]


def test_champion_on_other_files_is_not_comparable() -> None:
    truth = labels(20)
    decision = gate(challenger_table(truth), champion_table(truth, wrong=set(range(10)), prefix="other"),
                    RegisterParams())
    assert decision["move"] is False
    assert decision["why"] == ("champion was evaluated on other test files (0 of 20 shared): "
                               "not comparable; register.when_incomparable=keep")
    partial = champion_table(truth, wrong=set(range(10))).iloc[5:]  # 15 of the 20 files
    decision = gate(challenger_table(truth), partial, RegisterParams())
    assert decision["move"] is False
    assert "(15 of 20 shared)" in decision["why"]
    promote = RegisterParams(when_incomparable="promote")
    assert gate(challenger_table(truth), partial, promote)["move"] is True


def test_only_kept_challenger_files_need_a_champion_prediction() -> None:
    truth = labels(24)
    challenger = challenger_table(truth, wrong={21, 22}, not_kept={20, 21, 22, 23})
    champion = champion_table(truth[:20], wrong=set(range(10)))  # never saw files 20..23
    decision = gate(challenger, champion, RegisterParams())
    assert decision["n_files"] == 20
    assert decision["move"] is True
    assert decision["discordant"] == [0, 10]  # the filtered-out mistakes of the challenger do not count


def test_paired_bootstrap_path() -> None:
    truth = labels(40)
    params = RegisterParams(test="bootstrap", bootstrap_resamples=200, seed=0)
    decision = gate(challenger_table(truth), champion_table(truth, wrong=set(range(15))), params)
    assert decision["test"] == "paired_bootstrap"
    assert decision["move"] is True
    assert decision["p_value"] == 0.0  # no resample where the challenger is not better
    low, high = decision["ci"]
    assert 0 < low <= decision["improvement"] <= high
    assert "discordant" not in decision

    # one file apart: about (39/40)**40 = 36% of resamples miss it, so p is far above alpha
    small = gate(challenger_table(truth), champion_table(truth, wrong={7}), params)
    assert small["test"] == "paired_bootstrap"
    assert small["improvement"] > 0
    assert 0.2 < small["p_value"] < 0.6
    assert small["move"] is False

    worse = gate(challenger_table(truth, wrong=set(range(15))), champion_table(truth), params)
    assert worse["move"] is False and worse["p_value"] == 1.0 and worse["ci"][1] < 0


def test_bootstrap_with_multiclass_labels() -> None:
    rng = np.random.default_rng(0)
    truth = list(rng.choice(["a", "b", "c"], size=30))
    challenger = pd.DataFrame({"path": [f"x{i}" for i in range(30)], "label": truth, "predicted": truth,
                               "kept": True, "correct": True})
    champion_pred = ["a"] * 30  # a constant champion: balanced accuracy 1/3
    champion = pd.DataFrame({"path": challenger["path"], "predicted": champion_pred,
                             "correct": [p == t for p, t in zip(champion_pred, truth)]})
    decision = gate(challenger, champion, RegisterParams(test="bootstrap", bootstrap_resamples=100))
    assert decision["champion"] == pytest.approx(1 / 3)
    assert decision["move"] is True


# --- provenance ----------------------------------------------------------------------------

DATA_DVC = """outs:
- md5: 0123456789abcdef0123456789abcdef.dir
  size: 1234
  nfiles: 81
  hash: md5
  path: data/raw
"""


def test_provenance_outside_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    (tmp_path / "data.dvc").write_text(DATA_DVC)
    params = tmp_path / "params.yaml"
    params.write_text("register:\n  alpha: 0.05\n")
    tags = provenance(tmp_path / "data.dvc", params)
    assert tags == {"data_dvc_md5": "0123456789abcdef0123456789abcdef.dir",
                    "params_sha256": hashlib.sha256(b"register:\n  alpha: 0.05\n").hexdigest()[:16]}
    params.write_text("register:\n  alpha: 0.01\n")
    assert provenance(tmp_path / "data.dvc", params)["params_sha256"] != tags["params_sha256"]


def test_provenance_in_git_and_dvc_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("config", "user.email", "tests@soundline.invalid")
    git("config", "user.name", "soundline tests")
    (tmp_path / "data.dvc").write_text(DATA_DVC)
    (tmp_path / "params.yaml").write_text("register: {}\n")
    git("add", "-A")
    git("commit", "-q", "-m", "init")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "cnn-focal")
    tags = provenance(tmp_path / "data.dvc", tmp_path / "params.yaml")
    assert tags["git_commit"] == git("rev-parse", "HEAD").strip()
    assert len(tags["git_commit"]) == 40
    assert tags["dvc_experiment"] == "cnn-focal"
    assert tags["data_dvc_md5"] == "0123456789abcdef0123456789abcdef.dir"
    assert tags["params_sha256"] == hashlib.sha256(b"register: {}\n").hexdigest()[:16]


# --- the baseline gate --------------------------------------------------------------------------

def with_baseline(truth: list[str], model_wrong: set[int], baseline_wrong: set[int]) -> pd.DataFrame:
    table = challenger_table(truth, wrong=model_wrong)
    base = [flip(t) if i in baseline_wrong else t for i, t in enumerate(truth)]
    return table.assign(baseline_predicted=base, baseline_correct=[b == t for b, t in zip(base, truth)])


def test_at_least_refuses_a_model_below_the_baseline() -> None:
    truth = labels(20)
    slightly_worse = baseline_gate(with_baseline(truth, {0, 1}, set()), RegisterParams())
    assert slightly_worse["passed"] is False and "below the baseline" in slightly_worse["why"]
    assert slightly_worse["model"] < slightly_worse["baseline"] == 1.0 and slightly_worse["p_value"] == 0.5
    equal = baseline_gate(with_baseline(truth, set(), set()), RegisterParams())
    assert equal["passed"] is True and equal["gate"] == "at_least"


def test_at_least_refuses_a_significantly_worse_model_even_above_on_the_metric() -> None:
    # the gate's metric is balanced accuracy; a crippled model that predicts one class always
    truth = labels(40)
    crippled = with_baseline(truth, {i for i, t in enumerate(truth) if t == "bad"}, {0})
    decision = baseline_gate(crippled, RegisterParams())
    assert decision["passed"] is False and decision["worse"] is True and decision["p_value"] < 0.05


def test_significantly_better_needs_a_significant_win() -> None:
    truth = labels(20)
    params = RegisterParams(baseline_gate="significantly_better")
    assert baseline_gate(with_baseline(truth, set(), {0, 1}), params)["passed"] is False  # p = 0.5
    clear = baseline_gate(with_baseline(truth, set(), set(range(10))), params)
    assert clear["passed"] is True and clear["p_value"] == pytest.approx(2 / 2**10)


def test_baseline_gate_off_and_missing_columns() -> None:
    assert baseline_gate(challenger_table(labels(4)), RegisterParams(baseline_gate="off")) == {"gate": "off", "passed": True}
    with pytest.raises(ValueError, match="no baseline columns"):
        baseline_gate(challenger_table(labels(4)), RegisterParams())


def test_register_refuses_a_crippled_model_even_without_a_champion() -> None:
    """A model that always says "good" against a baseline that is nearly right: no alias, and why."""
    truth = labels(40)
    crippled = with_baseline(truth, {i for i, t in enumerate(truth) if t == "bad"}, {3})
    decision = register.gate(crippled, None, RegisterParams())
    assert decision["move"] is False and decision["why"].startswith("refused by the baseline gate: below the baseline")
    assert decision["baseline"]["p_value"] < 0.05
    good = register.gate(with_baseline(truth, set(), {3}), None, RegisterParams())
    assert good["move"] is True and good["baseline"]["passed"] is True


# --- task enhance: per-utterance scores, paired Wilcoxon ------------------------------------------

def enhance_table(model: list[float], ref: list[float] | None = None, prefix: str = "u") -> pd.DataFrame:
    """A predictions.csv of task enhance (the columns the gate reads, and a few more)."""
    n = len(model)
    ref = ref if ref is not None else [0.0] * n
    return pd.DataFrame({"path": [f"{prefix}{i:03d}.wav" for i in range(n)], "pair": [f"p{i}" for i in range(n)],
                         "snr_db": 5.0, "si_snr": model, "ref_si_snr": ref, "pesq": 2.0, "ref_pesq": 1.5})


SCORES = [float(s) for s in np.linspace(2.0, 12.0, 20)]  # per-utterance SI-SNR (dB) of one model


def test_enhance_better_challenger_takes_the_alias() -> None:
    champion = enhance_table(SCORES)[["path", "si_snr"]]
    challenger = enhance_table([s + 1.0 + 0.05 * i for i, s in enumerate(SCORES)], ref=SCORES)
    decision = register.gate(challenger, champion, RegisterParams(), task="enhance")
    assert decision["move"] is True and decision["why"] == "challenger is significantly better"
    assert decision["test"] == "wilcoxon" and decision["metric"] == "si_snr" and decision["n_files"] == 20
    assert decision["p_value"] == pytest.approx(2 / 2**20)  # exact: every one of 20 differences positive
    assert decision["improvement"] == pytest.approx(1.475)
    assert decision["baseline"]["passed"] is True
    bar = register.gate(challenger, champion, RegisterParams(min_improvement=2.0), task="enhance")
    assert bar["move"] is False and "(min 2.0)" in bar["why"]


def test_enhance_model_below_the_reference_is_refused_with_its_p_value() -> None:
    worse = enhance_table([s - 0.5 for s in SCORES], ref=SCORES)
    decision = register.gate(worse, None, RegisterParams(), task="enhance")
    assert decision["move"] is False
    assert decision["why"].startswith("refused by the baseline gate: below the reference (spectral gating): si_snr")
    baseline = decision["baseline"]
    assert baseline["gate"] == "at_least" and baseline["worse"] is True
    # twenty equal differences: tied ranks, so scipy's normal approximation, not the exact 2 / 2**20
    assert 0 < baseline["p_value"] < 1e-4 and baseline["improvement"] == pytest.approx(-0.5)
    assert baseline["model"] == pytest.approx(np.mean(SCORES) - 0.5) and baseline["baseline"] == pytest.approx(np.mean(SCORES))


def test_enhance_significantly_worse_model_is_refused_even_with_a_higher_mean() -> None:
    # one huge win, nineteen small losses: the mean favours the model, the signed ranks do not
    model = [s - 0.1 for s in SCORES[:19]] + [SCORES[19] + 10.0]
    decision = enhance_baseline_gate(enhance_table(model, ref=SCORES), RegisterParams())
    assert decision["improvement"] > 0 and decision["worse"] is True and decision["passed"] is False


def test_enhance_significantly_better_baseline_gate_and_off() -> None:
    params = RegisterParams(baseline_gate="significantly_better")
    tied = enhance_baseline_gate(enhance_table(SCORES, ref=SCORES), params)
    assert tied["passed"] is False and tied["p_value"] == 1.0
    assert enhance_baseline_gate(enhance_table(SCORES, ref=SCORES), RegisterParams())["passed"] is True  # at_least
    clear = enhance_baseline_gate(enhance_table([s + 3 for s in SCORES], ref=SCORES), params)
    assert clear["passed"] is True and clear["why"] == "significantly better than the reference (spectral gating)"
    off = enhance_baseline_gate(enhance_table([s - 3 for s in SCORES], ref=SCORES), RegisterParams(baseline_gate="off"))
    assert off == {"gate": "off", "passed": True}


def test_enhance_equal_model_keeps_the_champion() -> None:
    decision = enhance_champion_gate(enhance_table(SCORES), enhance_table(SCORES)[["path", "si_snr"]], RegisterParams())
    assert decision["move"] is False and decision["p_value"] == 1.0 and decision["improvement"] == 0.0
    assert decision["why"] == "not better enough: improvement +0.0000 (min 0.0), p=1 (alpha 0.05)"


def test_enhance_gate_on_another_metric() -> None:
    params = RegisterParams(enhance_metric="pesq")
    decision = register.gate(enhance_table(SCORES), None, params, task="enhance")
    assert decision["baseline"]["metric"] == "pesq" and decision["baseline"]["improvement"] == pytest.approx(0.5)


def test_enhance_champion_on_other_utterances_is_not_comparable() -> None:
    challenger = enhance_table([s + 2 for s in SCORES])
    other = enhance_table(SCORES, prefix="other")[["path", "si_snr"]]
    decision = enhance_champion_gate(challenger, other, RegisterParams())
    assert decision["move"] is False
    assert decision["why"] == ("champion was evaluated on other test utterances or without si_snr (0 of 20 shared): "
                               "not comparable; register.when_incomparable=keep")
    partial = enhance_table(SCORES)[["path", "si_snr"]].iloc[5:]
    assert "(15 of 20 shared)" in enhance_champion_gate(challenger, partial, RegisterParams())["why"]
    assert enhance_champion_gate(challenger, partial, RegisterParams(when_incomparable="promote"))["move"] is True
    no_metric = enhance_table(SCORES)[["path"]]  # the champion's predictions lack the metric
    assert "(0 of 20 shared)" in enhance_champion_gate(challenger, no_metric, RegisterParams())["why"]


def test_enhance_missing_scores_are_counted_and_missing_columns_named() -> None:
    table = enhance_table([s + 1 for s in SCORES], ref=SCORES)
    table.loc[0, "si_snr"] = np.nan
    decision = enhance_baseline_gate(table, RegisterParams())
    assert decision["n_files"] == 19 and decision["n_missing"] == 1
    with pytest.raises(ValueError, match="no 'ref_stoi' column"):
        enhance_baseline_gate(table, RegisterParams(enhance_metric="stoi"))


def test_enhance_registered_name_and_a_champion_of_the_other_task() -> None:
    from pipeline.contracts import EnhancerInfo, ModelInfo
    from pipeline.features import FeatureParams

    info = EnhancerInfo(spec={"arch": "unet"}, sample_rate=16000)
    name = register.registered_name(RegisterParams(), info)
    assert name.startswith("soundline-enhance-") and len(name.rsplit("-", 1)[1]) == 8
    assert register.registered_name(RegisterParams(task_suffix=False), info) == "soundline"
    classifier = ModelInfo(spec={}, classes=["a", "b"], binary=True, features=FeatureParams())
    with pytest.raises(ValueError, match=r"task: 'classify' -> 'enhance'.*register.task_suffix"):
        register.check_same_task("soundline", "3", classifier, info)
    with pytest.raises(ValueError, match=r"task: 'enhance' -> 'classify'.*register.task_suffix"):
        register.check_same_task("soundline", "3", info, classifier)
    other_rate = EnhancerInfo(spec={"arch": "unet"}, sample_rate=8000)
    with pytest.raises(ValueError, match="sample_rate: 8000 -> 16000"):
        register.check_same_task("soundline", "3", other_rate, info)
