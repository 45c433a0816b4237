"""Strip the symbol tables of the shared libraries under a folder (the image's venv), keeping any
library that stripping would break. Build stage only; needs binutils' ``strip``.

Most wheels ship unstripped ``.so`` files (torch, llvmlite, pyarrow, uvloop: ~220 MB of symbols
and debug info that nothing at run time reads). But libraries rewritten by patchelf (auditwheel's
``*.libs`` folders, numba's omppool, ...) can come out of ``strip`` unloadable ("ELF load command
address/offset not page-aligned"). So every library is stripped only if it dlopens on its own
before, and is put back unless it still dlopens after.

    python strip_libs.py /opt/venv
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

LOAD = "import ctypes, sys; ctypes.CDLL(sys.argv[1])"


def loads(path: Path) -> bool:
    """Whether ``path`` dlopens in a fresh interpreter (a crash on load counts as no)."""
    return subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True).returncode == 0


def is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def main(root: str) -> None:
    saved = stripped = kept = 0
    for path in sorted(Path(root).rglob("*.so*")):
        if not path.is_file() or path.is_symlink() or not is_elf(path):
            continue
        before = path.stat().st_size
        if not loads(path):  # cannot check it (needs other libraries loaded first): leave it
            kept += 1
            continue
        backup = path.with_name(path.name + ".unstripped")
        shutil.copy2(path, backup)
        if subprocess.run(["strip", "--strip-unneeded", str(path)], capture_output=True).returncode == 0 \
                and loads(path):
            backup.unlink()
            stripped += 1
            saved += before - path.stat().st_size
        else:
            os.replace(backup, path)
            kept += 1
    print(f"strip_libs: stripped {stripped} libraries ({saved / 1e6:.0f} MB saved), left {kept} as they were")


if __name__ == "__main__":
    main(sys.argv[1])
