"""Lightning overhead: seconds per training epoch of the train stage's ClassifierModule vs a plain loop.

    python benchmarks/train_overhead.py [--features data/features] [--repeats 5] [--warmup 1]
                                        [--threads 1] [--profile]

Both sides do the same work in one process, on the same real features (data/features when
``dvc repro`` has produced it, else the default corpus is built and featurized into a tmp dir
with the pipeline's own functions):

  * network: the CNN of params.yaml ``train.model``, built from the same spec with the same seed
    (the two copies start from identical weights);
  * data: ONE DataLoader from the stage's FeatureDataModule (batch 32, shuffle, drop_last,
    num_workers 0) over every clip of the index;
  * loss ``who`` (class-weighted BCE, balanced weights from the same labels), AdamW with the
    params' lr and weight decay; SpecAugment OFF on both sides;
  * no validation on either side. Lightning: logger=False, no checkpointing, progress bar or
    model summary, num_sanity_val_steps=0, limit_val_batches=0. The module is built by
    pipeline.stages.train.make_module, so its torchmetrics, per-step logging and warmup hook count.

Interleaved: one Trainer runs warmup + repeats epochs; a callback runs one plain epoch at the
start of every Lightning epoch, so the order is raw, lightning, raw, lightning, ... A Lightning
epoch is timed from the end of the plain epoch before it to the start of the next plain epoch
(or the end of training), so it includes every per-epoch hook, the epoch-end metric compute and
the scheduler step, but not Trainer setup. The first ``--warmup`` epochs of each are dropped;
the median of the rest counts (``ratio``). ``paired_ratio`` is the median over epochs of a
Lightning epoch divided by the mean of the plain epochs just before and after it, which is
steadier when other processes load the machine.

Writes benchmarks/results/train_overhead.json; the last line printed is
``lightning_over_raw=X``. ``--profile`` adds a cProfile of one Lightning epoch, restricted to
the functions of pipeline/training/modules.py and the Lightning/torchmetrics calls they make.
"""
from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, benchmark_parser, load_features, parse_benchmark_args, write_result  # noqa: E402

from pipeline.config import load_section  # noqa: E402
from pipeline.contracts import FeaturesFolder  # noqa: E402
from pipeline.stages.train import TrainParams, make_module  # noqa: E402
from pipeline.training.data import FeatureDataModule, LabelCoder  # noqa: E402
from pipeline.training.losses import build_loss  # noqa: E402
from pipeline.models.networks import build_network, make_spec  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "train_overhead.json"
BATCH_SIZE = 32


def stage_params() -> TrainParams:
    """params.yaml ``train`` with loss who, SpecAugment off, batch 32, no progress bar."""
    p = load_section("train", TrainParams, REPO / "params.yaml")
    trainer = p.trainer.model_copy(update={"batch_size": BATCH_SIZE, "progress_bar": False, "num_workers": 0})
    return p.model_copy(update={"mode": "classifier", "loss": "who", "specaugment": None, "trainer": trainer,
                                "init_from_pretrain": False})


class Interleave(Callback):
    """Runs ``raw_epoch`` at the start of each Lightning epoch and times the Lightning epochs."""

    def __init__(self, raw_epoch, profile_epoch: int | None = None) -> None:
        self.raw_epoch, self.profile_epoch = raw_epoch, profile_epoch
        self.raw: list[float] = []
        self.lightning: list[float] = []
        self._start: float | None = None
        self.profiler: cProfile.Profile | None = None

    def _close(self, trainer: L.Trainer) -> None:
        now = time.perf_counter()
        if self.profiler is not None:
            self.profiler.disable()
        if self._start is not None:
            self.lightning.append(now - self._start)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._close(trainer)
        with torch.enable_grad():
            self.raw.append(self.raw_epoch())
        if self.profile_epoch is not None and trainer.current_epoch == self.profile_epoch:
            self.profiler = cProfile.Profile()
            self.profiler.enable()
        self._start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._close(trainer)


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, repeats=5, repeats_help="timed epochs of each (>= 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs of each first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="cProfile one Lightning epoch")
    args = parse_benchmark_args(parser, argv, RESULT)

    with tempfile.TemporaryDirectory(prefix="train_overhead_") as tmp:
        features = load_features(args.features, Path(tmp))
        features_dir, index, meta = features.dir, features.index, features.meta
        n_mels, frames = meta.n_mels, meta.frames
        p = stage_params()
        coder = LabelCoder(meta.classes, p.positive_class)
        spec = make_spec(p.model, n_mels, frames, "classifier", coder.num_outputs)

        torch.manual_seed(args.seed)
        module = make_module(p, spec, coder, index, None)
        torch.manual_seed(args.seed)
        network = build_network(spec)
        for (name, a), b in zip(module.network.state_dict().items(), network.state_dict().values()):
            assert torch.equal(a, b), f"initial weights differ at {name}"
        loss_fn = build_loss(p.loss, len(coder.classes), p.class_weight, labels=coder.encode(index["label"]))
        assert torch.equal(loss_fn.weight, module.loss_fn.weight)
        optimizer = torch.optim.AdamW(network.parameters(), lr=p.trainer.lr, weight_decay=p.trainer.weight_decay)
        binary = coder.binary

        # One loader for both: same dataset, sampler, batch size, collate.
        loader = FeatureDataModule(FeaturesFolder(features_dir).array_path, coder, index, index, None, p.trainer).train_dataloader()
        batches = len(loader)

        def raw_epoch() -> float:
            network.train()
            start = time.perf_counter()
            for specs, targets, _ in loader:
                logits = network(specs)
                loss = loss_fn(logits.squeeze(-1) if binary else logits, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return time.perf_counter() - start

        epochs = args.warmup + args.repeats
        timer = Interleave(raw_epoch, profile_epoch=epochs - 1 if args.profile else None)
        trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                            precision=p.trainer.precision, accelerator="cpu", devices=1,
                            deterministic=p.trainer.deterministic, callbacks=[timer])
        trainer.fit(module, train_dataloaders=loader)
        assert len(timer.raw) == len(timer.lightning) == epochs, (timer.raw, timer.lightning)
        assert trainer.global_step == epochs * batches

    raw_s = statistics.median(timer.raw[args.warmup:])
    lightning_s = statistics.median(timer.lightning[args.warmup:])
    ratio = lightning_s / raw_s
    # Shared machines drift: each Lightning epoch against the mean of the plain epochs around it.
    neighbours = timer.raw[1:] + [timer.raw[-1]]
    paired = statistics.median(light / ((before + after) / 2) for light, before, after in
                               list(zip(timer.lightning, timer.raw, neighbours))[args.warmup:])
    result = {"lightning_epoch_s": round(lightning_s, 4), "raw_epoch_s": round(raw_s, 4), "ratio": round(ratio, 4),
              "batches": batches, "batch_size": BATCH_SIZE, "clips": len(index), "epochs_timed": args.repeats,
              "warmup_epochs": args.warmup, "threads": args.threads, "features": str(features_dir),
              "input_shape": [1, n_mels, frames], "model": p.model.arch, "loss": p.loss, "specaugment": False,
              "paired_ratio": round(paired, 4),
              "per_step_overhead_ms": round(1000 * (lightning_s - raw_s) / batches, 2),
              "details": {"lightning_epoch_s": [round(t, 4) for t in timer.lightning],
                          "raw_epoch_s": [round(t, 4) for t in timer.raw]}}
    write_result(args.out, result)
    if timer.profiler is not None:
        stats = pstats.Stats(timer.profiler)
        print("\ncProfile of the last Lightning epoch (cumulative; pipeline/training/modules.py and callees):")
        stats.sort_stats("cumulative").print_stats(r"modules\.py|torchmetrics|lightning/pytorch/core/module|"
                                                   r"result\.py|optimizer\.py|adam", 30)
    print(f"lightning_over_raw={ratio:.2f}")


if __name__ == "__main__":
    main()
