"""Stage filter: list the files to ignore, outliers by reconstruction loss OR signal energy.

Bounds are computed over the training split (``train_recon.csv`` + ``val_recon.csv``) and
applied to every file, held-out ones included, so the test set is filtered by a rule fixed
before it is seen. Each quantity has its own rule (params ``filter.reconstruction`` and
``filter.energy``); a rule with ``mode: null`` is off. Task enhance filters nothing (there is
no reconstruction loss): the list is empty and the metrics say why.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from pipeline.config import load_section, load_task
from pipeline.io import write_csv, write_json
from pipeline.outliers import FilterParams, bounds, select_ignored


def per_file(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per recording: the mean loss and energy of its segments, named by the file."""
    return (rows.groupby("file", sort=False)[["reconstruction_loss", "signal_energy"]].mean()
            .reset_index().rename(columns={"file": "filename"}))


def run(recon_dir: Path, p: FilterParams) -> tuple[pd.DataFrame, dict]:
    """Ignored rows (with reason and the bounds used) and a summary.

    ``level: file`` judges each recording by its segments' mean loss and energy and ignores all
    of its rows; ``segment`` (the default) judges every row on its own.
    """
    rows = {name: pd.read_csv(recon_dir / f"{name}_recon.csv") for name in ("train", "val", "test")}
    parts = {name: per_file(frame) for name, frame in rows.items()} if p.level == "file" else rows
    reference = pd.concat([parts["train"], parts["val"]], ignore_index=True)
    recon_low, recon_high = bounds(reference["reconstruction_loss"].to_numpy(), p.reconstruction)
    energy_low, energy_high = bounds(reference["signal_energy"].to_numpy(), p.energy)
    everything = pd.concat([frame.assign(part=name) for name, frame in parts.items()], ignore_index=True)
    # Fixed bounds from the reference: hardcode mode applies them as they are to every file.
    fixed = FilterParams.model_validate({
        "reconstruction": {"mode": "hardcode", "lower": recon_low, "upper": recon_high} if p.reconstruction.mode else {},
        "energy": {"mode": "hardcode", "lower": energy_low, "upper": energy_high} if p.energy.mode else {},
    })
    ignored = select_ignored(everything, fixed.reconstruction, fixed.energy)
    ignored = ignored.merge(everything[["filename", "part"]], on="filename", how="left")
    judged = {"level": p.level, "judged": len(everything), "ignored": len(ignored),
              "ignored_by_part": ignored["part"].value_counts().to_dict(),
              "ignored_by_reason": ignored["reason"].value_counts().to_dict()}
    if p.level == "file":  # every row (segment) of an ignored recording
        all_rows = pd.concat(rows.values(), ignore_index=True)[["filename", "file"]]
        ignored = (ignored.rename(columns={"filename": "file"}).merge(all_rows, on="file")
                   .drop(columns="file")[["filename", *ignored.columns.drop("filename")]])
    summary = {**judged, "ignored_rows": len(ignored),
               "bounds": {"reconstruction_loss": [recon_low, recon_high], "signal_energy": [energy_low, energy_high]}}
    return ignored, summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recon", type=Path, required=True, help="folder of *_recon.csv from pretrain")
    parser.add_argument("--out", type=Path, required=True, help="ignored files CSV")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        params = load_section("filter", FilterParams, args.params)
        if load_task(args.params) == "enhance":
            write_csv(args.out, pd.DataFrame(columns=["filename", "reason"]))
            write_json(args.metrics, {"skipped": "task: enhance filters no recordings"})
            print("filter: task enhance, nothing to filter")
            return
        ignored, summary = run(args.recon, params)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"filter: {err}")
    write_csv(args.out, ignored)
    write_json(args.metrics, summary)
    print(f"filter: ignoring {summary['ignored']} of {summary['judged']} {summary['level']}s "
          f"({summary['ignored_rows']} rows) {summary['ignored_by_reason']}")


if __name__ == "__main__":
    main()
