"""Ingest a folder of your own recordings as ``data/raw``: copy the files, write ``metadata.csv``.

Labels and groups come from each file's path (relative to SRC, "/"-separated), parsed by a
regular expression that must match the whole path and name the groups ``label`` and ``group``;
any other named group becomes an extra metadata column. Files that do not match are skipped
(and counted). Then ``dvc add data/raw`` records the new data in ``data.dvc``.

Examples:
  Free Spoken Digit Dataset (``{digit}_{speaker}_{n}.wav``; speaker is the group)::

    python -m pipeline.data.ingest ../shared/data/fsdd/recordings \\
        --pattern '(?P<label>\\d)_(?P<group>[a-z]+)_\\d+\\.wav'

  Speech Commands (``<word>/{speaker_hash}_nohash_{n}.wav``)::

    python -m pipeline.data.ingest ../shared/data/speech_commands_mini \\
        --pattern '(?P<label>[^/]+)/(?P<group>[0-9a-f]+)_nohash_\\d+\\.wav'
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import pandas as pd

from pipeline.io import atomic_dir

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
REQUIRED_GROUPS = ("label", "group")


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile ``pattern``; raise ValueError if it is invalid or lacks a required named group."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"invalid --pattern {pattern!r}: {err}") from err
    for name in REQUIRED_GROUPS:
        if name not in regex.groupindex:
            raise ValueError(f"--pattern must define the named group '{name}', e.g. (?P<{name}>...)")
    return regex


def audio_files(src: Path) -> list[str]:
    """Paths (relative to ``src``, posix form, sorted) of every audio file under ``src``."""
    return sorted(p.relative_to(src).as_posix() for p in src.rglob("*")
                  if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


def scan(src: Path | str, pattern: str) -> pd.DataFrame:
    """Match every audio file under ``src`` against ``pattern`` (``re.fullmatch``).

    Returns one row per matching file, sorted by path, every value a string: columns path,
    label, group, then the other named groups in pattern order. The relative paths of audio
    files that did not match are in ``frame.attrs["skipped"]``.
    Raises:
        ValueError: bad pattern, or ``src`` is not a directory.
    """
    src = Path(src)
    regex = compile_pattern(pattern)
    if not src.is_dir():
        raise ValueError(f"{src}: not a directory")
    extra = [g for g in regex.groupindex if g not in REQUIRED_GROUPS]
    rows, skipped = [], []
    for rel in audio_files(src):
        match = regex.fullmatch(rel)
        if match is None:
            skipped.append(rel)
        else:
            rows.append({"path": rel, **{g: match.group(g) or "" for g in (*REQUIRED_GROUPS, *extra)}})
    frame = pd.DataFrame(rows, columns=["path", *REQUIRED_GROUPS, *extra], dtype=str)
    frame = frame.sort_values("path", ignore_index=True)
    frame.attrs["skipped"] = skipped
    return frame


def limit_per_group(metadata: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """Keep the first ``limit`` files (by path) of every (group, label) pair; None keeps all."""
    if limit is None:
        return metadata
    return metadata.groupby(["group", "label"], sort=False).head(limit).sort_values("path", ignore_index=True)


def ingest(src: Path, metadata: pd.DataFrame, out: Path) -> None:
    """Copy the files listed in ``metadata`` from ``src`` into ``out`` (replaced atomically)."""
    with atomic_dir(out) as tmp:
        for rel in metadata["path"]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, tmp / rel)
        metadata.to_csv(tmp / "metadata.csv", index=False, lineterminator="\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Examples:" + __doc__.split("Examples:")[1])
    parser.add_argument("src", type=Path, help="folder of recordings (searched recursively)")
    parser.add_argument("--pattern", required=True,
                        help="regex over the relative path with named groups label and group")
    parser.add_argument("--out", type=Path, default=Path("data/raw"))
    parser.add_argument("--limit-per-group", type=int, default=None, metavar="N",
                        help="keep only the first N files of every (group, label)")
    args = parser.parse_args(argv)
    if args.limit_per_group is not None and args.limit_per_group < 1:
        parser.error("--limit-per-group must be >= 1")
    try:
        metadata = scan(args.src, args.pattern)
    except ValueError as err:
        sys.exit(f"ingest: {err}")
    skipped = metadata.attrs["skipped"]
    if skipped:
        print(f"ingest: skipped {len(skipped)} file(s) not matching --pattern, e.g.:")
        for rel in skipped[:5]:
            print(f"  {rel}")
    if metadata.empty:
        sys.exit(f"ingest: no audio file under {args.src} matches --pattern {args.pattern!r}")
    metadata = limit_per_group(metadata, args.limit_per_group)
    ingest(args.src, metadata, args.out)
    print(f"ingest: copied {len(metadata)} files ({metadata['label'].nunique()} labels, "
          f"{metadata['group'].nunique()} groups) to {args.out}")
    print(f"next: run `dvc add {args.out}` to version it (updates data.dvc), then `dvc repro`")


if __name__ == "__main__":
    main()
