"""pipeline.training and the train stage's wiring, on a tiny synthetic features folder.

Every run is small (32 x 32 spectrograms, batches of 8, one torch thread) so the whole file
stays well under a minute on two shared cores. Everything is written under tmp_path.
"""
from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from pipeline.stages.train import TrainParams, TripletParams, fold_rows, make_module
from pipeline.training.kfold import summarize
from pipeline.models.networks import ModelParams
from pipeline.training.config import TrainerParams
from pipeline.training.data import EpochSampler, FeatureDataModule, FeatureDataset, LabelCoder, balanced_weights
from pipeline.training.kfold import EpochHistory, fingerprint, fit_fold, prepare_workdir, read_history
from pipeline.training.losses import LOSSES
from pipeline.training.modules import ClassifierModule, MAEModule, TripletModule, layer_decay_groups
from pipeline.models.networks import build_network, make_spec

from tests.conftest import SYNTH_CLASSES as CLASSES
from tests.conftest import SYNTH_FRAMES as FRAMES
from tests.conftest import SYNTH_N_MELS as N_MELS
from tests.conftest import write_synthetic_features


# --- synthetic features folder (tests/conftest.py) ------------------------------------------

@pytest.fixture(scope="module")
def features_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_features(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def index(features_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(features_dir / "index.parquet")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on two shared cores more threads only fight each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_synthetic_index_is_usable(index: pd.DataFrame) -> None:
    train = index[index["split"] == "train"]
    assert sorted(train["fold"].unique()) == [0, 1, 2]
    assert (index.loc[index["split"] == "test", "fold"] == -1).all()
    # Every fold holds both classes, or balanced class weights and AUROC would be undefined.
    assert (train.groupby("fold")["label"].nunique() == 2).all()


# --- helpers ------------------------------------------------------------------------------

CODER = LabelCoder(CLASSES, "good")
FAST = TrainerParams(fast_dev_run=True, progress_bar=False, batch_size=8)


def tiny_model(arch: str, **kw) -> ModelParams:
    return ModelParams(arch=arch, mae_preset="demo", patch_size=8, **kw)


def stage_module(p: TrainParams, train: pd.DataFrame) -> L.LightningModule:
    """The module exactly as pipeline.stages.train.run builds it (spec task, make_module)."""
    task = "classifier" if p.mode == "classifier" else ("mae" if p.model.arch == "mae" else "embedder")
    spec = make_spec(p.model, N_MELS, FRAMES, task, CODER.num_outputs)
    return make_module(p, spec, CODER, train, None)


def auto_module(model: ModelParams, trainer: TrainerParams) -> MAEModule:
    """The module as pipeline.stages.pretrain.run builds it (mode auto)."""
    return MAEModule(build_network(make_spec(model, N_MELS, FRAMES, task="mae")), trainer)


def record_training_losses(module: L.LightningModule) -> list[float]:
    """Wrap ``module.training_step`` so every returned loss is kept."""
    losses: list[float] = []
    step = module.training_step

    def recorded(batch, batch_idx):
        loss = step(batch, batch_idx)
        losses.append(float(loss.detach()))
        return loss

    module.training_step = recorded
    return losses


def datamodule(features_dir: Path, train: pd.DataFrame, val: pd.DataFrame, p: TrainerParams,
               oversample: bool = False) -> FeatureDataModule:
    return FeatureDataModule(features_dir / "features.npy", CODER, train, val, None, p, oversample=oversample)


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kwargs})


# --- fast_dev_run over every valid mode x model x loss -----------------------------------

CASES = ([("classifier", arch, loss, "none") for arch in ("cnn", "mae") for loss in LOSSES]
         + [("triplet", "cnn", "weighted_ce", "none")]
         + [("triplet", "mae", "weighted_ce", recon) for recon in ("none", "mse", "logcosh")]
         + [("auto", "mae", None, None)])


@pytest.mark.parametrize(("mode", "arch", "loss", "recon"), CASES,
                         ids=[f"{m}-{a}-{r if m == 'triplet' else l}" for m, a, l, r in CASES])
def test_fast_dev_run(mode: str, arch: str, loss: str | None, recon: str | None,
                      features_dir: Path, index: pd.DataFrame, tmp_path: Path) -> None:
    if mode == "auto":
        module = auto_module(tiny_model("mae"), FAST)
        train, val = fold_rows(index, set(), 0, TrainParams(trainer=FAST))
    else:
        triplet = TripletParams(recon=recon, recon_weight=0.5 if recon != "none" else 0.0)
        p = TrainParams(mode=mode, model=tiny_model(arch), loss=loss, triplet=triplet, trainer=FAST)
        train, val = fold_rows(index, set(), 0, p)
        module = stage_module(p, train)
    expected = {"auto": MAEModule, "classifier": ClassifierModule, "triplet": TripletModule}[mode]
    assert type(module) is expected
    before = {k: v.detach().clone() for k, v in module.network.named_parameters()}  # not BN buffers
    losses = record_training_losses(module)

    result = fit_fold("fold_0", module, datamodule(features_dir, train, val, FAST), FAST, tmp_path / "fold_0")

    assert len(losses) == 1 and math.isfinite(losses[0]), losses  # one train step with a finite loss
    assert math.isfinite(result["score"]) and result["monitor"] == "val/loss"
    if mode == "classifier":
        assert {"val/acc", "val/f1", "val/auroc"} <= set(result["metrics"])
    after = load_file(str(tmp_path / "fold_0" / "model.safetensors"))
    assert after.keys() == module.network.state_dict().keys()
    # The optimizer step changed the trained parameters, and those were exported.
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "no trained parameter changed"
    assert (tmp_path / "fold_0" / "result.json").exists()


def test_triplet_recon_needs_mae_fails_cleanly(features_dir: Path, index: pd.DataFrame, tmp_path: Path) -> None:
    """recon is documented as MAE-only; with the CNN it must fail with a message, not mid-training."""
    with pytest.raises(ValueError, match="triplet.recon needs model.arch: mae"):
        TrainParams(mode="triplet", model=tiny_model("cnn"), triplet=TripletParams(recon="mse", recon_weight=1.0),
                    trainer=FAST)


def test_unknown_loss_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"(?s)loss.*'weighted_ce'.*hinge"):
        TrainParams(loss="hinge", model=tiny_model("cnn"), trainer=FAST)


def test_seed_era_param_names_still_work() -> None:
    old = TrainParams.model_validate({"loss": "who", "extend_bad": True})
    assert old.loss == "weighted_ce" and old.oversample_minority is True


# --- overfitting one batch ----------------------------------------------------------------

class EpochLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.losses.append(float(trainer.callback_metrics["train/loss"]))


def overfit(module: L.LightningModule, features_dir: Path, train: pd.DataFrame, p: TrainerParams,
            epochs: int) -> list[float]:
    L.seed_everything(0, verbose=False)
    record = EpochLosses()
    trainer = quiet_trainer(max_epochs=epochs, overfit_batches=1, callbacks=[record])
    loader = datamodule(features_dir, train, train, p).train_dataloader()
    trainer.fit(module, train_dataloaders=loader)  # no val loader: only the one batch
    assert len(record.losses) == epochs
    return record.losses


def test_classifier_overfits_one_batch(features_dir: Path, index: pd.DataFrame) -> None:
    tp = TrainerParams(lr=3e-3, scheduler="none", warmup_epochs=0, batch_size=8, progress_bar=False)
    p = TrainParams(model=ModelParams(arch="cnn", dropout=0.0), loss="bce", specaugment=None, trainer=tp)
    train, _ = fold_rows(index, set(), 0, p)
    torch.manual_seed(0)
    losses = overfit(stage_module(p, train), features_dir, train, tp, epochs=60)
    assert losses[0] > 0.3  # it starts near chance (BCE of a coin flip is 0.69)
    assert losses[-1] < 0.05, losses[-5:]


def test_mae_overfits_one_batch(features_dir: Path, index: pd.DataFrame) -> None:
    tp = TrainerParams(lr=3e-3, scheduler="none", warmup_epochs=0, batch_size=8, progress_bar=False)
    train, _ = fold_rows(index, set(), 0, TrainParams(trainer=tp))
    torch.manual_seed(0)
    losses = overfit(auto_module(tiny_model("mae", mask_ratio=0.5), tp), features_dir, train, tp, epochs=100)
    final = float(np.mean(losses[-3:]))  # masking is random per step: average the last epochs
    assert final < 0.2 * losses[0], (losses[0], losses[-5:])


# --- LabelCoder, FeatureDataset, oversampling --------------------------------------------

def test_label_coder_binary_puts_the_positive_class_at_one() -> None:
    coder = LabelCoder(["good", "bad"], "good")
    assert coder.binary and coder.num_outputs == 1 and coder.order == ["bad", "good"]
    assert coder.encode(["good", "bad", "good"]).tolist() == [1, 0, 1]
    flipped = LabelCoder(["good", "bad"], "bad")
    assert flipped.order == ["good", "bad"]
    assert flipped.encode(pd.Series(["good", "bad"])).tolist() == [0, 1]
    assert flipped.encode(["bad"]).dtype == np.int64
    with pytest.raises(ValueError, match="positive_class 'ok'"):
        LabelCoder(["good", "bad"], "ok")


def test_label_coder_multiclass_is_sorted_and_rejects_unknown_labels() -> None:
    coder = LabelCoder(["zero", "one", "two"], positive_class=None)
    assert not coder.binary and coder.num_outputs == 3
    assert coder.order == ["one", "two", "zero"]
    assert coder.encode(["zero", "one", "two"]).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match=r"\['four'\]"):
        coder.encode(["one", "four"])


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_feature_dataset_items(features_dir: Path, memory_efficient: bool) -> None:
    rows = np.array([40, 3, 17, 3])
    targets = np.array([1, 0, 1, 0])
    data = FeatureDataset(features_dir / "features.npy", rows, targets, memory_efficient)
    array = np.load(features_dir / "features.npy")
    assert len(data) == 4
    for i, row in enumerate(rows):
        spec, target, got_row = data[i]
        assert spec.shape == (1, N_MELS, FRAMES) and spec.dtype == torch.float32
        assert target.dtype == torch.int64 and target.ndim == 0 and int(target) == targets[i]
        assert got_row.dtype == torch.int64 and int(got_row) == row
        np.testing.assert_array_equal(spec[0].numpy(), array[row])


def test_feature_dataset_modes_are_identical(features_dir: Path, index: pd.DataFrame) -> None:
    rows = index["row"].to_numpy()[::-1].copy()
    targets = CODER.encode(index["label"])[::-1].copy()
    lazy = FeatureDataset(features_dir / "features.npy", rows, targets, memory_efficient=True)
    eager = FeatureDataset(features_dir / "features.npy", rows, targets, memory_efficient=False)
    assert isinstance(eager._array, np.ndarray) and lazy._array is None  # RAM copy vs lazy memmap
    for i in range(len(rows)):
        for a, b in zip(lazy[i], eager[i]):
            assert torch.equal(a, b)


def oversampler(targets: np.ndarray, seed: int) -> EpochSampler:
    return EpochSampler(len(targets), seed, balanced_weights(targets))


def test_oversampler_draws_classes_equally() -> None:
    targets = np.array([0] * 40 + [1] * 8)
    draws = np.concatenate([targets[list(oversampler(targets, seed=s))] for s in range(40)])
    assert len(draws) == 40 * 48
    assert 0.45 < draws.mean() < 0.55  # 1/6 without oversampling
    assert list(oversampler(targets, 3)) == list(oversampler(targets, 3))  # seeded


def test_epoch_sampler_order_follows_seed_and_epoch_alone() -> None:
    sampler = EpochSampler(20, seed=5)
    sampler.set_epoch(3)
    third = list(sampler)
    torch.manual_seed(123)  # the global generator plays no part
    again = EpochSampler(20, seed=5)
    again.set_epoch(3)
    assert list(again) == third and sorted(third) == list(range(20))
    again.set_epoch(4)
    assert list(again) != third


def test_datamodule_oversamples_train_only(features_dir: Path, index: pd.DataFrame) -> None:
    p = TrainerParams(batch_size=8, progress_bar=False)
    train = index[(index["split"] == "train") & (index["fold"] != 0)]
    # An imbalanced train frame: every bad clip but only 3 good ones.
    train = pd.concat([train[train["label"] == "bad"], train[train["label"] == "good"].head(3)])
    val = index[(index["split"] == "train") & (index["fold"] == 0)]
    dm = datamodule(features_dir, train, val, p, oversample=True)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochSampler) and loader.sampler.weights is not None
    batches = []
    for epoch in range(20):
        loader.sampler.set_epoch(epoch)
        batches += [batch[1] for batch in loader]
    assert 0.35 < torch.cat(batches).float().mean() < 0.65  # 3 of 15 without oversampling
    assert not isinstance(dm.val_dataloader().sampler, EpochSampler)  # validation: in order, once each
    with pytest.raises(ValueError, match="no test rows"):
        dm.test_dataloader()


# --- fingerprints, work folders, history --------------------------------------------------

def test_fingerprint_is_stable_and_order_insensitive() -> None:
    a = fingerprint({"lr": 0.001, "layers": [1, 2]}, Path("x/y"), None)
    assert a == fingerprint({"layers": [1, 2], "lr": 0.001}, Path("x/y"), None)  # key order
    assert a == fingerprint({"lr": 0.001, "layers": [1, 2]}, "x/y", None)  # Paths hash as strings
    assert len(a) == 16 and int(a, 16) >= 0
    # A fixed value: the hash must not depend on the process (PYTHONHASHSEED) or the platform.
    assert fingerprint({"b": 1, "a": [1, "x"]}) == "c22b12f7d147ff88"
    assert a != fingerprint({"lr": 0.002, "layers": [1, 2]}, Path("x/y"), None)
    assert a != fingerprint({"lr": 0.001, "layers": [2, 1]}, Path("x/y"), None)


def test_prepare_workdir_keeps_same_key_and_wipes_other(tmp_path: Path) -> None:
    work = tmp_path / "work"
    prepare_workdir(work, "aaa")
    (work / "fold_0").mkdir()
    (work / "fold_0" / "result.json").write_text("{}")
    prepare_workdir(work, "aaa")
    assert (work / "fold_0" / "result.json").exists()
    prepare_workdir(work, "bbb")
    assert not (work / "fold_0").exists()
    assert (work / "fingerprint.txt").read_text().strip() == "bbb"
    # A folder without a stamp is not trusted either.
    (work / "fingerprint.txt").unlink()
    (work / "stale").mkdir()
    prepare_workdir(work, "bbb")
    assert not (work / "stale").exists() and (work / "fingerprint.txt").exists()


def test_read_history_keeps_the_last_row_of_a_resumed_epoch(tmp_path: Path) -> None:
    path = tmp_path / "history.csv"
    assert read_history(path).empty
    pd.DataFrame({"fold": ["fold_0"] * 5 + ["fold_1"], "epoch": [0, 1, 2, 2, 3, 2],
                  "val/loss": [0.9, 0.8, 0.7, 0.65, 0.6, 0.5]}).to_csv(path, index=False)
    history = read_history(path)
    fold0 = history[history["fold"] == "fold_0"]
    assert fold0["epoch"].tolist() == [0, 1, 2, 3]
    assert fold0.loc[fold0["epoch"] == 2, "val/loss"].item() == 0.65  # the resumed run's row
    assert len(history[history["fold"] == "fold_1"]) == 1  # same epoch, other fold: kept


def test_epoch_history_appends_across_trainers(features_dir: Path, index: pd.DataFrame, tmp_path: Path) -> None:
    p = TrainerParams(batch_size=8, progress_bar=False, scheduler="none", warmup_epochs=0)
    tp = TrainParams(model=tiny_model("cnn"), trainer=p)
    train, val = fold_rows(index, set(), 0, tp)
    path = tmp_path / "history.csv"
    for _ in range(2):
        trainer = quiet_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                                callbacks=[EpochHistory(path, "fold_0")])
        trainer.fit(stage_module(tp, train), datamodule=datamodule(features_dir, train, val, p))
    raw = pd.read_csv(path)
    assert len(raw) == 2 and {"train/loss", "val/loss", "val/auroc"} <= set(raw.columns)
    assert len(read_history(path)) == 1  # both runs were epoch 0


# --- the train stage's fold selection and summary -----------------------------------------

def test_fold_rows_filters_and_subsamples(index: pd.DataFrame) -> None:
    pool = index[index["split"] == "train"]
    ignored = set(pool[pool["fold"] == 1]["path"].head(2)) | set(pool[pool["fold"] == 0]["path"].head(1))
    ignored |= set(index[index["split"] == "test"]["path"].head(1))
    full_train, full_val = fold_rows(index, ignored, 0, TrainParams())
    assert not (set(full_train["path"]) | set(full_val["path"])) & ignored
    assert set(full_val["fold"]) == {0} and 0 not in set(full_train["fold"])
    assert (full_train["split"] == "train").all() and (full_val["split"] == "train").all()
    assert len(full_train) == (pool["fold"] != 0).sum() - 2
    assert len(full_val) == (pool["fold"] == 0).sum() - 1

    half = TrainParams(label_fraction=0.5)
    train, val = fold_rows(index, ignored, 0, half)
    pd.testing.assert_frame_equal(val, full_val)  # validation is never subsampled
    assert set(train["path"]) < set(full_train["path"])
    counts, full_counts = train["label"].value_counts(), full_train["label"].value_counts()
    for label in CLASSES:  # stratified: half of each class
        assert counts[label] == round(0.5 * full_counts[label])
    again, _ = fold_rows(index, ignored, 0, half)
    assert again["path"].tolist() == train["path"].tolist()  # seeded
    reseeded = TrainParams(label_fraction=0.5, trainer=TrainerParams(seed=7))
    assert fold_rows(index, ignored, 0, reseeded)[0]["path"].tolist() != train["path"].tolist()


def fold_result(name: str, score: float | None, loss: float, resumed: bool = False, skipped: bool = False) -> dict:
    return {"fold": name, "score": score, "resumed": resumed, "skipped": skipped,
            "metrics": {"val/loss": loss, "val/auroc": 1 - loss}}


def test_summarize_picks_the_final_fold_by_monitor_mode() -> None:
    results = [fold_result("fold_0", 0.5, 0.5, resumed=True), fold_result("fold_1", 0.2, 0.2, skipped=True),
               fold_result("fold_2", 0.8, 0.8)]
    low = summarize(results, TrainerParams(monitor="val/loss", monitor_mode="min"))
    assert low["final_fold"] == "fold_1"
    assert low["folds"] == 3 and low["resumed_folds"] == 1 and low["skipped_folds"] == 1
    assert low["cv/val/loss_mean"] == pytest.approx(0.5)
    assert low["cv/val/loss_std"] == pytest.approx(np.std([0.5, 0.2, 0.8]))
    assert low["cv/val/auroc_mean"] == pytest.approx(0.5)
    assert set(low["per_fold"]) == {"fold_0", "fold_1", "fold_2"}
    high = summarize(results, TrainerParams(monitor="val/auroc", monitor_mode="max"))
    assert high["final_fold"] == "fold_2"
    # A fold without a score (monitor never logged) is never chosen over one with a score.
    missing = [fold_result("fold_0", None, 0.1), fold_result("fold_1", 0.3, 0.3)]
    assert summarize(missing, TrainerParams(monitor_mode="min"))["final_fold"] == "fold_1"


# --- schedulers and warmup ------------------------------------------------------------------

BASE_LR = 1e-3


@pytest.mark.parametrize("scheduler", ["none", "cosine_restarts", "one_cycle", "plateau"])
def test_schedulers_run(scheduler: str, features_dir: Path, index: pd.DataFrame, tmp_path: Path) -> None:
    tp = TrainerParams(scheduler=scheduler, warmup_epochs=0, lr=BASE_LR, max_epochs=2, batch_size=8,
                       progress_bar=False, restart_epochs=10)
    p = TrainParams(model=tiny_model("cnn"), specaugment=None, trainer=tp)
    train, val = fold_rows(index, set(), 0, p)
    module = stage_module(p, train)
    result = fit_fold("fold_0", module, datamodule(features_dir, train, val, tp), tp, tmp_path / "fold_0")
    assert result["epochs"] == 2 and math.isfinite(result["score"])
    assert len(read_history(tmp_path / "fold_0" / "history.csv")) == 2
    steps = module.trainer.global_step
    assert steps == 2 * math.floor(len(train) / 8)  # drop_last on train
    lr = module.trainer.optimizers[0].param_groups[0]["lr"]
    expected = {"none": BASE_LR, "plateau": BASE_LR,  # no plateau within two epochs
                "cosine_restarts": BASE_LR * (1 + math.cos(math.pi * 2 / 10)) / 2}
    if scheduler == "one_cycle":  # stepped once per optimizer step over the estimated total
        reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR)
        cycle = torch.optim.lr_scheduler.OneCycleLR(reference, max_lr=BASE_LR, total_steps=steps)
        for _ in range(steps):
            reference.step()
            cycle.step()
        expected["one_cycle"] = reference.param_groups[0]["lr"]
    assert lr == pytest.approx(expected[scheduler])


class LearningRates(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize(("warmup_epochs", "warmup_steps"), [(1.0, 3), (0.5, 2)])
def test_linear_warmup_raises_lr(warmup_epochs: float, warmup_steps: int, features_dir: Path,
                                 index: pd.DataFrame) -> None:
    tp = TrainerParams(scheduler="none", warmup_epochs=warmup_epochs, lr=BASE_LR, batch_size=8, progress_bar=False)
    p = TrainParams(model=tiny_model("cnn"), specaugment=None, trainer=tp)
    train, val = fold_rows(index, set(), 0, p)
    assert len(train) // 8 == 3  # batches per epoch
    record = LearningRates()
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0, callbacks=[record])
    trainer.fit(stage_module(p, train), datamodule=datamodule(features_dir, train, val, tp))
    ramp = [BASE_LR * (k + 1) / warmup_steps for k in range(warmup_steps)]
    assert record.lrs[0] < BASE_LR
    assert record.lrs[:warmup_steps] == pytest.approx(ramp)
    assert record.lrs[warmup_steps:] == pytest.approx([BASE_LR] * (6 - warmup_steps))


# --- mixed precision on CPU ------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["cnn", "mae"])
def test_bf16_mixed_on_cpu(arch: str, features_dir: Path, index: pd.DataFrame, tmp_path: Path) -> None:
    tp = TrainerParams(fast_dev_run=True, progress_bar=False, batch_size=8, precision="bf16-mixed",
                       accelerator="cpu")
    p = TrainParams(model=tiny_model(arch), trainer=tp)
    train, val = fold_rows(index, set(), 0, p)
    module = stage_module(p, train)
    losses = record_training_losses(module)
    try:
        result = fit_fold("fold_0", module, datamodule(features_dir, train, val, tp), tp, tmp_path / "fold_0")
    except (RuntimeError, ValueError) as err:
        if "bf16" in str(err) or "BFloat16" in str(err) or "bfloat16" in str(err).lower():
            pytest.skip(f"bf16-mixed is not supported on this CPU: {err}")
        raise
    assert module.trainer.precision == "bf16-mixed"
    assert len(losses) == 1 and math.isfinite(losses[0]) and math.isfinite(result["score"])


def test_16_mixed_on_cpu(features_dir: Path, index: pd.DataFrame, tmp_path: Path) -> None:
    tp = TrainerParams(fast_dev_run=True, progress_bar=False, batch_size=8, precision="16-mixed",
                       accelerator="cpu")
    p = TrainParams(model=tiny_model("cnn"), trainer=tp)
    train, val = fold_rows(index, set(), 0, p)
    module = stage_module(p, train)
    try:
        result = fit_fold("fold_0", module, datamodule(features_dir, train, val, tp), tp, tmp_path / "fold_0")
    except (RuntimeError, ValueError) as err:
        pytest.skip(f"precision 16-mixed is unsupported on CPU: {err}")
    # Lightning 2.x has no fp16 autocast on CPU and substitutes bf16-mixed (with a warning).
    assert module.trainer.precision in ("16-mixed", "bf16-mixed")
    assert math.isfinite(result["score"])


# --- layer-wise learning-rate decay (MAE fine-tuning) ------------------------------------------

def test_layer_decay_groups_scale_blocks_by_depth() -> None:
    network = build_network(make_spec(tiny_model("mae"), N_MELS, FRAMES, "classifier", 1))
    depth = len(network.backbone.blocks)
    groups = layer_decay_groups(network, 1e-3, 0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for name, param in network.named_parameters():
        if name.startswith("head"):
            expected = 1.0
        elif ".blocks." in f".{name}" and "decoder" not in name:
            expected = 0.5 ** (depth - int(name.split("blocks.")[1].split(".")[0]))
        elif any(e in name for e in ("patch_embed", "cls_token", "pos_embed")) and "decoder" not in name:
            expected = 0.5 ** (depth + 1)
        else:
            expected = 1.0
        assert scale_of[id(param)] == pytest.approx(expected), name
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))
    assert all(g["lr"] == pytest.approx(1e-3 * g["lr_scale"]) for g in groups)
    with pytest.raises(ValueError, match="transformer"):
        layer_decay_groups(build_network(make_spec(tiny_model("cnn"), N_MELS, FRAMES, "classifier", 1)), 1e-3, 0.5)


def test_layer_decay_in_training_keeps_the_ratios(features_dir: Path, index: pd.DataFrame) -> None:
    tp = TrainerParams(scheduler="one_cycle", lr=BASE_LR, layer_decay=0.5, batch_size=8, progress_bar=False)
    p = TrainParams(model=tiny_model("mae"), specaugment=None, trainer=tp)
    train, val = fold_rows(index, set(), 0, p)
    module = stage_module(p, train)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule(features_dir, train, val, tp))
    groups = trainer.optimizers[0].param_groups
    head = next(g for g in groups if g["lr_scale"] == 1.0)
    for g in groups:  # the one-cycle schedule moved every group, keeping each one's scale
        assert g["lr"] == pytest.approx(head["lr"] * g["lr_scale"])
    with pytest.raises(ValueError, match="layer_decay"):
        TrainParams(model=tiny_model("cnn"), trainer=tp)
