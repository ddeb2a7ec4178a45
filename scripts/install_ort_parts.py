"""Join the onnxruntime-gpu parts carried to a GPU machine and install their files into a folder that
goes on PYTHONPATH (scripts/gpu_check.sh, step 1):

    python3 scripts/install_ort_parts.py PARTS SITE

PARTS holds p00, p01, ... in either of two forms, told apart by the joined file's first bytes:
scripts/ort_gpu_parts.sh's .tar.xz of the wheel's files, or ../shared/gpu/prepare-ort-gpu.sh's wheel
split as it is (a zip). Both are unpacked as they are: onnxruntime-gpu's wheel keeps every file in
its package and dist-info folders (no .data folder, no scripts to write), so SITE then holds what
`pip install --target SITE` would put there, whatever version or Python tag the wheel was built for.
A problem is one line on stderr and exit code 2, SITE left as it was."""

from __future__ import annotations

import lzma
import shutil
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

XZ_MAGIC = b"\xfd7zXZ\x00"
ZIP_MAGIC = b"PK\x03\x04"


def fail(problem: str) -> None:
    print(f"error: onnxruntime-gpu parts | {problem}", file=sys.stderr)
    sys.exit(2)


def main(parts: Path, site: Path) -> None:
    pieces = sorted(parts.glob("p[0-9][0-9]"))
    if not pieces:
        fail(f"no parts p00, p01, ... in {parts}. Expected: the parts of scripts/ort_gpu_parts.sh "
             "(or ../shared/gpu/prepare-ort-gpu.sh) carried there, one call per part")
    with tempfile.TemporaryDirectory() as tmp:
        joined = Path(tmp) / "joined"
        with open(joined, "wb") as out:
            for piece in pieces:
                out.write(piece.read_bytes())
        head = joined.read_bytes()[:6]
        carried = f"{len(pieces)} part{'s' * (len(pieces) != 1)} in {parts}"
        unpacked = Path(tmp) / "site"
        try:
            if head.startswith(XZ_MAGIC):
                with tarfile.open(joined) as archive:
                    archive.extractall(unpacked, filter="data")
            elif head.startswith(ZIP_MAGIC):
                with zipfile.ZipFile(joined) as wheel:
                    wheel.extractall(unpacked)
            else:
                fail(f"{carried} join into neither a .tar.xz nor a wheel (first bytes {head!r}). "
                     "Expected: every part of one split, none missing or cut short")
        except (tarfile.TarError, zipfile.BadZipFile, lzma.LZMAError, zlib.error, EOFError, OSError) as e:
            fail(f"{carried} do not unpack ({type(e).__name__}: {e}). "
                 "Expected: every part of one split, none missing or cut short")
        site.mkdir(parents=True, exist_ok=True)
        for entry in unpacked.iterdir():  # whole, or not at all: a failed unpack above left SITE as it was
            if (site / entry.name).is_dir():
                shutil.rmtree(site / entry.name)
            shutil.move(str(entry), str(site / entry.name))
    print(f"onnxruntime-gpu: {len(pieces)} parts unpacked into {site}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        fail("usage: install_ort_parts.py PARTS SITE")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
