"""Training input pipeline: samples/s of the FeatureDataModule's train DataLoader vs one .pt file per clip.

    python benchmarks/loader.py [--features data/features] [--repeats 5] [--threads 1]

Same rows (every clip of the index's train split), same run, same DataLoader settings
(batch 32, shuffle, drop_last, num_workers 0), each item the same (spec (1, n_mels, frames)
float32, target int64, row int64):

  memmap: FeatureDataModule(memory_efficient=True).train_dataloader(): each item is read from
          the memory-mapped features.npy (the stage's low-RAM path);
  ram:    FeatureDataModule(memory_efficient=False): rows copied into RAM once when the loader
          is built (not timed), items sliced from that array;
  pt:     the common baseline: every clip written with torch.save to its own file in a tmp dir,
          items read with torch.load(weights_only=True).

The page cache cannot be flushed here, so every variant is warmed with one full pass first;
then the variants are interleaved (memmap, ram, pt, memmap, ...) for ``--repeats``
measurements of ``--passes`` full passes each, and the median samples/s of each counts. Features come from data/features (``dvc repro``), else
the default corpus is built and featurized into a tmp dir (see benchmarks/common.py).

Writes benchmarks/results/loader.json; the last line printed is ``memmap_over_pt_files=X``.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, benchmark_parser, load_features, parse_benchmark_args, write_result  # noqa: E402

from pipeline.contracts import FeaturesFolder  # noqa: E402
from pipeline.training.config import TrainerParams  # noqa: E402
from pipeline.training.data import FeatureDataModule, LabelCoder  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "loader.json"
BATCH_SIZE = 32


class PtFiles(Dataset):
    """One ``<row>.pt`` file per clip, loaded on every access."""

    def __init__(self, folder: Path, rows: np.ndarray, targets: np.ndarray) -> None:
        self.paths = [folder / f"{row}.pt" for row in rows]
        self.rows, self.targets = rows, targets

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.load(self.paths[i], weights_only=True), torch.tensor(self.targets[i]),
                torch.tensor(self.rows[i]))


def write_pt_files(features: Path, rows: np.ndarray, folder: Path) -> None:
    array = np.load(features, mmap_mode="r")
    for row in rows:
        torch.save(torch.from_numpy(np.array(array[row], dtype=np.float32))[None], folder / f"{row}.pt")


def timed_passes(loader: DataLoader, passes: int) -> tuple[float, int]:
    """(seconds, samples) of ``passes`` full iterations."""
    samples = 0
    start = time.perf_counter()
    for _ in range(passes):
        for specs, targets, rows in loader:
            samples += len(specs)
    return time.perf_counter() - start, samples


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, repeats=7, repeats_help="timed measurements of each variant (>= 3)")
    parser.add_argument("--passes", type=int, default=10, help="full passes over the rows per measurement")
    args = parse_benchmark_args(parser, argv, RESULT)

    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        features = load_features(args.features, Path(tmp))
        features_dir, index, meta = features.dir, features.index, features.meta
        train = index[index["split"] == "train"]
        coder = LabelCoder(meta.classes, meta.classes[-1] if len(meta.classes) == 2 else None)
        rows, targets = train["row"].to_numpy(), coder.encode(train["label"])

        loaders: dict[str, DataLoader] = {}
        for name, memory_efficient in (("memmap", True), ("ram", False)):
            p = TrainerParams(batch_size=BATCH_SIZE, num_workers=0, memory_efficient=memory_efficient)
            loaders[name] = FeatureDataModule(FeaturesFolder(features_dir).array_path, coder, train, train, None,
                                              p).train_dataloader()
        pt_dir = Path(tmp) / "pt"
        pt_dir.mkdir()
        write_pt_files(features_dir / "features.npy", rows, pt_dir)
        reference = loaders["memmap"]
        loaders["pt"] = DataLoader(PtFiles(pt_dir, rows, targets), batch_size=BATCH_SIZE, shuffle=True,
                                   num_workers=0, drop_last=reference.drop_last)

        # Same items on every path (shuffle aside): compare a few by row.
        datasets = {name: loader.dataset for name, loader in loaders.items()}
        for i in (0, len(rows) // 2, len(rows) - 1):
            items = [datasets[name][i] for name in ("memmap", "ram", "pt")]
            for a in items[1:]:
                assert all(torch.equal(x, y) for x, y in zip(items[0], a)), f"item {i} differs"

        for loader in loaders.values():  # warm: page cache, memmap, allocator
            timed_passes(loader, 1)
        times: dict[str, list[float]] = {name: [] for name in loaders}
        counts: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, loader in loaders.items():
                seconds, counts[name] = timed_passes(loader, args.passes)
                times[name].append(seconds)

    rate = {name: counts[name] / statistics.median(t) for name, t in times.items()}
    assert len(set(counts.values())) == 1, counts
    result = {
        "memmap_samples_per_s": round(rate["memmap"], 1),
        "ram_samples_per_s": round(rate["ram"], 1),
        "pt_files_samples_per_s": round(rate["pt"], 1),
        "memmap_over_pt_files": round(rate["memmap"] / rate["pt"], 2),
        "ram_over_pt_files": round(rate["ram"] / rate["pt"], 2),
        "samples_per_pass": counts["memmap"] // args.passes, "batch_size": BATCH_SIZE, "num_workers": 0,
        "repeats": args.repeats, "passes_per_measurement": args.passes, "threads": args.threads, "item_shape": [1, *meta.shape[1:]],
        "features": str(features_dir),
        "details": {name: [round(s, 4) for s in t] for name, t in times.items()},
    }
    write_result(args.out, result)
    print(f"memmap_over_pt_files={rate['memmap'] / rate['pt']:.2f}")


if __name__ == "__main__":
    main()
