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

  Paired noisy/clean recordings (task enhance): the pattern matches the noisy files and names
  ``group``; ``--clean`` builds each one's clean reference from the named groups; ``snr_db``, if
  named, is kept (validate_raw checks it)::

    python -m pipeline.data.ingest ~/vb_demand --pattern 'noisy/(?P<group>p\\d+)_(?P<utt>\\d+)_(?P<snr_db>-?\\d+)dB\\.wav' \\
        --clean 'clean/{group}_{utt}.wav'

  or a CSV listing them (columns noisy, clean, group; optional snr_db and any others)::

    python -m pipeline.data.ingest ~/my_pairs --pairs pairs.csv
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


def scan_pairs(src: Path | str, pattern: str, clean: str) -> pd.DataFrame:
    """Noisy files under ``src`` matching ``pattern`` (which names ``group``), each paired with the
    clean file ``clean.format(**named groups)``: columns path, group, pair, then the other
    named groups. Non-matching files are in ``attrs["skipped"]``; a clean file that does not
    exist is an error naming it."""
    src = Path(src)
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"invalid --pattern {pattern!r}: {err}") from err
    if "group" not in regex.groupindex:
        raise ValueError("--pattern must define the named group 'group', e.g. (?P<group>...)")
    if not src.is_dir():
        raise ValueError(f"{src}: not a directory")
    extra = [g for g in regex.groupindex if g != "group"]
    rows, skipped = [], []
    for rel in audio_files(src):
        if (match := regex.fullmatch(rel)) is None:
            skipped.append(rel)
            continue
        fields = {g: match.group(g) or "" for g in regex.groupindex}
        try:
            pair = clean.format(**fields)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"--clean {clean!r} uses a name --pattern does not define: {err}") from err
        rows.append({"path": rel, "group": fields["group"], "pair": pair, **{g: fields[g] for g in extra}})
    frame = pd.DataFrame(rows, columns=["path", "group", "pair", *extra], dtype=str)
    return _checked_pairs(src, frame.sort_values("path", ignore_index=True), skipped)


def read_pairs(src: Path | str, csv: Path | str) -> pd.DataFrame:
    """The pairs a CSV lists (columns noisy, clean, group; others kept), as ``scan_pairs`` returns."""
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    missing = {"noisy", "clean", "group"} - set(table.columns)
    if missing:
        raise ValueError(f"{csv}: missing column(s) {sorted(missing)} (needs noisy, clean, group)")
    frame = table.rename(columns={"noisy": "path", "clean": "pair"})
    frame = frame[["path", "group", "pair", *[c for c in frame.columns if c not in ("path", "group", "pair")]]]
    return _checked_pairs(Path(src), frame.sort_values("path", ignore_index=True), [])


def _checked_pairs(src: Path, frame: pd.DataFrame, skipped: list[str]) -> pd.DataFrame:
    absent = sorted({rel for rel in (*frame["path"], *frame["pair"]) if not (src / rel).is_file()})
    if absent:
        raise ValueError(f"{len(absent)} listed file(s) not found under {src}: {absent[:5]}")
    if overlap := sorted(set(frame["path"]) & set(frame["pair"])):
        raise ValueError(f"file(s) listed both as noisy and as clean: {overlap[:5]}")
    frame.attrs["skipped"] = skipped
    return frame


def limit_per_group(metadata: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """Keep the first ``limit`` files (by path) of every (group, label) pair; None keeps all."""
    if limit is None:
        return metadata
    return metadata.groupby(["group", "label"], sort=False).head(limit).sort_values("path", ignore_index=True)


def ingest(src: Path, metadata: pd.DataFrame, out: Path) -> None:
    """Copy the files listed in ``metadata`` (``path``, and ``pair`` when paired) from ``src``
    into ``out`` (replaced atomically)."""
    files = list(metadata["path"]) + (sorted(set(metadata["pair"])) if "pair" in metadata else [])
    with atomic_dir(out) as tmp:
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, tmp / rel)
        metadata.to_csv(tmp / "metadata.csv", index=False, lineterminator="\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Examples:" + __doc__.split("Examples:")[1])
    parser.add_argument("src", type=Path, help="folder of recordings (searched recursively)")
    parser.add_argument("--pattern", help="regex over the relative path with named groups label and group "
                                          "(with --clean: group, over the noisy files)")
    parser.add_argument("--clean", metavar="TEMPLATE",
                        help="paired data: each noisy file's clean reference, e.g. 'clean/{group}_{utt}.wav'")
    parser.add_argument("--pairs", type=Path, metavar="CSV", help="paired data listed in a CSV (noisy, clean, group)")
    parser.add_argument("--out", type=Path, default=Path("data/raw"))
    parser.add_argument("--limit-per-group", type=int, default=None, metavar="N",
                        help="keep only the first N files of every (group, label)")
    args = parser.parse_args(argv)
    if args.limit_per_group is not None and args.limit_per_group < 1:
        parser.error("--limit-per-group must be >= 1")
    if (args.pattern is None) == (args.pairs is None):
        parser.error("give --pattern (optionally with --clean) or --pairs")
    paired = args.pairs is not None or args.clean is not None
    try:
        metadata = (read_pairs(args.src, args.pairs) if args.pairs is not None
                    else scan_pairs(args.src, args.pattern, args.clean) if args.clean is not None
                    else scan(args.src, args.pattern))
    except (ValueError, OSError) as err:
        sys.exit(f"ingest: {err}")
    skipped = metadata.attrs["skipped"]
    if skipped:
        print(f"ingest: skipped {len(skipped)} file(s) not matching --pattern, e.g.:")
        for rel in skipped[:5]:
            print(f"  {rel}")
    if metadata.empty:
        sys.exit(f"ingest: no audio file under {args.src} matches --pattern {args.pattern!r}")
    if paired:
        ingest(args.src, metadata, args.out)
        print(f"ingest: copied {len(metadata)} noisy and {metadata['pair'].nunique()} clean files "
              f"({metadata['group'].nunique()} groups) to {args.out}; set task: enhance in params.yaml")
    else:
        metadata = limit_per_group(metadata, args.limit_per_group)
        ingest(args.src, metadata, args.out)
        print(f"ingest: copied {len(metadata)} files ({metadata['label'].nunique()} labels, "
              f"{metadata['group'].nunique()} groups) to {args.out}")
    print(f"next: run `dvc add {args.out}` to version it (updates data.dvc), then `dvc repro`")


if __name__ == "__main__":
    main()
