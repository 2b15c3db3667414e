#!/usr/bin/env python3
"""Exports scikit-learn's 8x8 digits (1,797 images, the UCI "Optical Recognition of Handwritten
Digits" test set, CC BY 4.0) to examples/data/digits.bin for `cargo run --example digits`.

The data ships inside the scikit-learn wheel (sklearn/datasets/data/digits.csv.gz); this script
downloads the wheel with pip (no install, no scikit-learn import) and reads the CSV from it.

Format of digits.bin: 1,797 records of 65 bytes — 64 pixel intensities 0..16 (row-major 8x8),
then the label 0..9 — in the CSV's order. Run again to regenerate; the output is byte-identical.

    python3 scripts/export_digits.py [--wheel PATH] [--out examples/data/digits.bin]
"""
import argparse
import glob
import gzip
import io
import os
import subprocess
import sys
import tempfile
import zipfile


def find_wheel(path):
    if path:
        return path
    tmp = tempfile.mkdtemp(prefix="kiln-digits-")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "scikit-learn", "--no-deps",
         "--only-binary=:all:", "-d", tmp, "-q"],
        check=True,
    )
    return glob.glob(os.path.join(tmp, "*.whl"))[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wheel", help="a scikit-learn wheel already downloaded")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "examples", "data", "digits.bin"))
    args = ap.parse_args()
    with zipfile.ZipFile(find_wheel(args.wheel)) as z:
        text = gzip.decompress(z.read("sklearn/datasets/data/digits.csv.gz")).decode()
    out = bytearray()
    rows = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        values = [int(float(v)) for v in line.split(",")]
        if len(values) != 65 or not all(0 <= v <= 16 for v in values[:64]) or not 0 <= values[64] <= 9:
            sys.exit(f"unexpected row {rows}: {line[:80]}")
        out.extend(values)
        rows += 1
    if rows != 1797:
        sys.exit(f"expected 1797 rows, read {rows}")
    with open(args.out, "wb") as f:
        f.write(out)
    print(f"wrote {rows} images to {os.path.normpath(args.out)} ({len(out)} bytes)")


if __name__ == "__main__":
    main()
