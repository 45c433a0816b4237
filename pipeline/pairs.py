"""Checks of paired (noisy, clean) enhancement data, as pure functions returning problems.

A paired corpus lists one row per noisy recording, with ``pair`` the relative path of its clean
reference (``pipeline.data.enhance_corpus`` writes such a ``metadata.csv``). A model trained on
it learns noisy -> clean sample by sample, so a pair is only usable when both sides exist, share
a sample rate and a length; and a clean utterance must stay in one split, or the test set scores
noisy copies of a reference the model was trained to reproduce.

Each problem is one human-readable line that names the file(s); an empty list means usable.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from pydantic import Field, model_validator

from pipeline import audio
from pipeline.config import Section


class PairParams(Section):
    """``validate_raw.pairs`` (task enhance)."""

    length_tolerance_s: float = Field(0.01, ge=0)  # largest accepted duration difference of a pair
    snr_db: tuple[float, float] = (-10.0, 30.0)  # bounds of a stated snr_db

    @model_validator(mode="after")
    def _order(self) -> PairParams:
        if self.snr_db[0] > self.snr_db[1]:
            raise ValueError(f"snr_db bounds must be [low, high], got {list(self.snr_db)}")
        return self


def _present(value: object) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _probe(root: Path, rel: str, cache: dict[str, audio.AudioInfo | str]) -> audio.AudioInfo | str:
    """Header of ``root/rel`` or the problem reading it; each file read once (clean sides repeat)."""
    if rel not in cache:
        path = root / rel
        if not path.is_file():
            cache[rel] = f"{rel}: file is missing"
        else:
            try:
                cache[rel] = audio.probe(path, name=rel)
            except audio.AudioError as err:
                cache[rel] = str(err)
    return cache[rel]


def check_pairs(metadata: pd.DataFrame, root: Path, length_tolerance_s: float = 0.0,
                snr_bounds: tuple[float, float] | None = None) -> list[str]:
    """Problems of the pairs listed in ``metadata`` (columns ``path``, ``pair``, optional ``snr_db``).

    Args:
        metadata: one row per noisy file; ``path`` and ``pair`` relative to ``root``.
        length_tolerance_s: largest accepted difference between the two sides' durations.
        snr_bounds: (low, high) dB that a stated ``snr_db`` must lie in; a missing value is not
            checked, it states nothing.
    Returns:
        One line per problem, naming the noisy file and, where it is involved, the clean one.
    """
    problems: list[str] = []
    headers: dict[str, audio.AudioInfo | str] = {}
    for row in metadata.itertuples(index=False):
        noisy, clean = row.path, getattr(row, "pair", None)
        if not _present(clean):
            problems.append(f"{noisy}: no clean reference (pair is empty)")
            continue
        snr = getattr(row, "snr_db", None)
        if snr_bounds is not None and pd.notna(snr) and not snr_bounds[0] <= float(snr) <= snr_bounds[1]:
            problems.append(f"{noisy}: snr_db {float(snr):g} outside [{snr_bounds[0]:g}, {snr_bounds[1]:g}] dB")
        noisy_info, clean_info = _probe(root, noisy, headers), _probe(root, clean, headers)
        if isinstance(clean_info, str):
            problems.append(f"{noisy}: clean reference unusable: {clean_info}")
        if isinstance(noisy_info, str):
            problems.append(noisy_info)
        if isinstance(noisy_info, str) or isinstance(clean_info, str):
            continue
        if noisy_info.sample_rate != clean_info.sample_rate:
            problems.append(f"{noisy} ({noisy_info.sample_rate} Hz) and {clean} ({clean_info.sample_rate} Hz): "
                            f"sample rates differ")
            continue  # durations at different rates say nothing about sample alignment
        gap = abs(noisy_info.duration_s - clean_info.duration_s)
        if gap > length_tolerance_s:
            problems.append(f"{noisy} ({noisy_info.duration_s:.3f} s) and {clean} ({clean_info.duration_s:.3f} s): "
                            f"lengths differ by {gap:.3f} s > tolerance {length_tolerance_s:g} s")
    return problems


def check_pair_splits(index: pd.DataFrame) -> list[str]:
    """Clean references whose noisy copies sit in more than one split (columns ``path``, ``pair``, ``split``).

    Returns:
        One line per such clean file, naming its splits and the noisy file in each.
    """
    problems = []
    for clean, rows in index.groupby("pair", sort=True):
        splits = rows.groupby("split", sort=True)["path"].first()
        if len(splits) > 1:
            where = ", ".join(f"{split} ({path})" for split, path in splits.items())
            problems.append(f"{clean}: clean reference in {len(splits)} splits: {where}")
    return problems
