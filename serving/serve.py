"""Serve the packaged Bento archive on loopback, importing it into the local BentoML store first.

``make serve`` runs ``python -m serving.serve models/bento/soundline.bento``. The archive is the
package stage's DVC output, so after ``git clone`` and ``dvc pull`` this serves the champion
without running the pipeline. The local store is BENTOML_HOME (default ~/bentoml).
"""
from __future__ import annotations

import argparse
import os
import sys
import tarfile
from pathlib import Path

import yaml


def archive_tag(archive: Path) -> str:
    """The Bento tag recorded in the archive's ``bento.yaml``."""
    try:
        with tarfile.open(archive) as tar:
            member = next((m for m in tar.getmembers() if Path(m.name).as_posix().lstrip("./") == "bento.yaml"), None)
            if member is None:
                raise ValueError(f"{archive}: no bento.yaml inside; not a Bento archive")
            info = yaml.safe_load(tar.extractfile(member).read())
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"{archive}: cannot read the Bento archive ({err})") from err
    return f"{info['name']}:{info['version']}"


def ensure_imported(archive: Path) -> str:
    """Import ``archive`` into the local store unless its Bento is there; return its tag."""
    import bentoml
    from bentoml.exceptions import NotFound

    tag = archive_tag(archive)
    try:
        bentoml.get(tag)
    except NotFound:
        bentoml.import_bento(str(archive.resolve()))  # a relative path is read from the root
        print(f"serve: imported {tag} from {archive} into the local BentoML store")
    return tag


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path, help="the package stage's Bento archive")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args(argv)
    if not args.archive.exists():
        sys.exit(f"serve: {args.archive} not found: run `make demo` (or `dvc pull`) first")
    try:
        tag = ensure_imported(args.archive)
    except ValueError as err:
        sys.exit(f"serve: {err}")
    print(f"serve: {tag} on http://{args.host}:{args.port}", flush=True)
    os.execvp(sys.executable, [sys.executable, "-m", "bentoml", "serve", tag,
                               "--host", args.host, "--port", str(args.port)])


if __name__ == "__main__":
    main()
