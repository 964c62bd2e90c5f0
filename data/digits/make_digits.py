#!/usr/bin/env python3
"""Builds data/digits/digits.safetensors from scikit-learn's copy of the UCI hand-written digits.

The UCI ML hand-written digits data (Alpaydin & Kaynak, 1998) ships inside every scikit-learn
wheel as `sklearn/datasets/data/digits.csv.gz`: 1,797 rows of 64 pixel values (0..16, an 8x8
image, row-major) followed by the class label (0..9). This script reads that file (from the wheel
or from an extracted csv.gz), draws a fixed, seeded, stratified train/calib/test split, and writes
one safetensors file with three uint8 tensors:

    x      [1797, 64]  pixel values 0..16, in the csv's row order
    y      [1797]      class 0..9
    split  [1797]      0 = train, 1 = calib, 2 = test

Only the Python standard library and numpy are used; the safetensors file is written by hand
(8-byte little-endian header length, JSON header padded with spaces to a multiple of 8, raw data).

Regenerate (see README.md):
    pip download --no-deps scikit-learn==1.9.1 -d /tmp/skl
    python data/digits/make_digits.py /tmp/skl/scikit_learn-1.9.1-*.whl data/digits/digits.safetensors
"""

import gzip
import hashlib
import json
import random
import struct
import sys
import zipfile

import numpy as np

MEMBER = "sklearn/datasets/data/digits.csv.gz"
SEED = 20240607
FRACTIONS = {"calib": 0.10, "test": 0.30}  # the rest is train
SPLIT_CODES = {"train": 0, "calib": 1, "test": 2}


def read_csv_gz(path):
    """Returns the decompressed csv text from a wheel (zip) or a .csv.gz file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            raw = z.read(MEMBER)
    else:
        with open(path, "rb") as f:
            raw = f.read()
    return gzip.decompress(raw).decode("ascii")


def parse(text):
    rows = [line.split(",") for line in text.strip().splitlines()]
    data = np.array([[float(v) for v in row] for row in rows], dtype=np.float64)
    if data.shape != (1797, 65):
        sys.exit(f"expected 1797 rows of 65 values, got {data.shape}")
    if not np.all(data == np.round(data)):
        sys.exit("non-integer values in the csv")
    x = data[:, :64].astype(np.uint8)
    y = data[:, 64].astype(np.uint8)
    assert x.max() <= 16 and y.max() <= 9
    return x, y


def stratified_split(y):
    """Per class: shuffle the indices with a fixed seed, take 10 % calib, 30 % test, rest train."""
    rng = random.Random(SEED)
    split = np.zeros(len(y), dtype=np.uint8)
    for c in range(10):
        idx = [int(i) for i in np.flatnonzero(y == c)]
        rng.shuffle(idx)
        n_calib = round(FRACTIONS["calib"] * len(idx))
        n_test = round(FRACTIONS["test"] * len(idx))
        for i in idx[:n_calib]:
            split[i] = SPLIT_CODES["calib"]
        for i in idx[n_calib : n_calib + n_test]:
            split[i] = SPLIT_CODES["test"]
    return split


def write_safetensors(path, tensors, metadata):
    header = {"__metadata__": metadata}
    blobs = []
    offset = 0
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr)
        assert arr.dtype == np.uint8
        b = arr.tobytes()
        header[name] = {"dtype": "U8", "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: make_digits.py SCIKIT_LEARN_WHEEL_OR_DIGITS_CSV_GZ OUT.safetensors")
    src, out = sys.argv[1], sys.argv[2]
    x, y = parse(read_csv_gz(src))
    split = stratified_split(y)
    metadata = {
        "source": "UCI ML hand-written digits (Alpaydin & Kaynak 1998), scikit-learn's digits.csv.gz",
        "license": "CC BY 4.0",
        "split": "0=train 1=calib 2=test, stratified, seed %d" % SEED,
    }
    write_safetensors(out, [("split", split), ("x", x), ("y", y)], metadata)
    for name, code in SPLIT_CODES.items():
        print(f"{name}: {int((split == code).sum())}")
    with open(out, "rb") as f:
        print("sha256:", hashlib.sha256(f.read()).hexdigest())


if __name__ == "__main__":
    main()
