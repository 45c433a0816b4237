"""Score recordings from the command line, without a server, exactly as the service does.

``python -m pipeline.predict INPUT... --model MODEL [--out predictions.csv] [--mc-dropout N]``

INPUT: files, folders (searched recursively for audio) or glob patterns. MODEL: a model folder
(``models/train``), ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` from the MLflow
registry, or a BentoML tag (a Bento, e.g. the package stage's, or a BentoML model). Every file
gets its label, the class probabilities, the drift guard's verdict (``in_distribution`` and the
failed checks) and, with ``--mc-dropout N``, a 95% interval of the predicted class's probability
over N dropout samples; with a model that scores long recordings as segments, one more row per
window. Output: CSV (default) or JSON (``--out *.json``); files that cannot be decoded are
reported with their error, and the exit status is 1 if any was.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from rich.progress import track

from pipeline import audio
from pipeline.contracts import MODEL_ARTIFACT, ModelFolder
from pipeline.data.ingest import AUDIO_SUFFIXES
from pipeline.features import aggregate_segments, log_mel_batch
from pipeline.models.inference import ExportedModel
from pipeline.profile import Profile
from pipeline.scoring import Scored, answer, prepare, score_clips


def inputs(items: list[str]) -> list[Path]:
    """Audio files named by ``items`` (files, folders, glob patterns), sorted, each once."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found += [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES]
        elif path.is_file():
            found.append(path)
        else:
            matches = [Path(m) for m in glob.glob(item, recursive=True)]
            if not matches:
                raise FileNotFoundError(f"{item}: no such file, folder or pattern")
            found += [p for p in matches if p.is_file()]
    return sorted(dict.fromkeys(found))


def model_folder(spec: str, tmp: Path) -> Path:
    """A local model folder for ``spec`` (see the module docstring)."""
    if Path(spec).is_dir():
        return Path(spec)
    if spec.startswith("models:/"):
        from pipeline import tracking

        name, _, rest = spec.removeprefix("models:/").partition("/")
        name, _, alias = name.partition("@")
        version = tracking.get_alias_version(name, alias) if alias else rest
        if not version:
            raise ValueError(f"{spec}: no such registered version or alias")
        return tracking.download_artifact(tracking.version_run_id(name, version), MODEL_ARTIFACT, tmp)
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        return Path(bentoml.models.get(spec).path)
    except NotFound:
        try:
            bento = bentoml.get(spec)
        except NotFound as err:
            raise ValueError(f"{spec}: not a model folder, a models:/ URI, nor a BentoML model or Bento tag") from err
        tags = [m.tag for service in bento.info.services for m in service.models] or [m.tag for m in bento.info.models]
        if not tags:
            raise ValueError(f"{spec}: the Bento packs no model")
        return Path(bentoml.models.get(tags[0]).path)


def mc_interval(model: ExportedModel, clips: np.ndarray, name: str, label: str, passes: int, seed: int) -> tuple[float, float]:
    """95% interval of the probability of ``label`` over ``passes`` Monte-Carlo dropout samples."""
    feats = log_mel_batch(clips, model.info.features)[0]
    samples = model.mc_dropout_probabilities(feats, np.arange(len(feats)), passes, seed)  # (passes, n, K)
    how = model.info.segment.aggregate if model.info.segment else "mean"
    files = np.full(len(clips), name)
    picked = [aggregate_segments(s, files, how)[1][0][model.classes.index(label)] for s in samples]
    low, high = np.percentile(picked, [2.5, 97.5])
    return float(low), float(high)


def rows(scored: Scored, interval: tuple[float, float] | None) -> list[dict]:
    """The file's row, then one per window."""
    base = {"file": scored.name, "segment": None, "start_s": None, "label": scored.label,
            **{f"prob_{c}": p for c, p in scored.probabilities.items()},
            "in_distribution": scored.in_distribution, "drift": ",".join(scored.drift)}
    if interval is not None:
        base["prob_mc_low"], base["prob_mc_high"] = interval
    windows = [{"file": scored.name, "segment": k, "start_s": start, **{f"prob_{c}": p for c, p in probs.items()}}
               for k, (start, probs) in enumerate(scored.segments or [])]
    return [base, *windows]


def predict(files: list[Path], model: ExportedModel, drift_profile: Profile | None, mc_dropout: int = 0,
            seed: int = 0, progress: bool = True) -> tuple[pd.DataFrame, dict[str, str]]:
    """(one row per file and per window, {file: error} for files that could not be read)."""
    out, errors = [], {}
    for path in track(files, description="predict", disable=not progress or len(files) < 2):
        try:
            upload = prepare(path.read_bytes(), str(path), model)
        except (audio.AudioError, OSError) as err:
            errors[str(path)] = str(err)
            continue
        scored = answer(model, upload, score_clips(model, upload.clips), drift_profile)
        interval = mc_interval(model, upload.clips, upload.name, scored.label, mc_dropout, seed) if mc_dropout > 1 else None
        out += rows(scored, interval)
    return pd.DataFrame(out), errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("inputs", nargs="+", help="audio files, folders or glob patterns")
    parser.add_argument("--model", required=True, help="model folder, models:/name@alias, or BentoML tag")
    parser.add_argument("--out", type=Path, help="CSV or .json (default: CSV on standard output)")
    parser.add_argument("--mc-dropout", type=int, default=0, metavar="N", help="N > 1: dropout samples per file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            files = inputs(args.inputs)
            folder = model_folder(args.model, Path(tmp))
            model = ExportedModel.load(folder)
            table, errors = predict(files, model, ModelFolder(folder).profile(), args.mc_dropout, args.seed,
                                    progress=args.out is not None)
        except (ValueError, FileNotFoundError) as err:
            sys.exit(f"predict: {err}")
    if args.out is not None and args.out.suffix == ".json":
        args.out.write_text(json.dumps({"predictions": json.loads(table.to_json(orient="records")),
                                        "errors": errors}, indent=2) + "\n")
    elif args.out is not None:
        table.to_csv(args.out, index=False, lineterminator="\n")
    else:
        sys.stdout.write(table.to_csv(index=False, lineterminator="\n"))
    for path, error in errors.items():
        print(f"predict: {error}", file=sys.stderr)
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
