#!/usr/bin/env python3
"""Writes N data-free 28x28 images as an IDX3 file for FedTSA's lower-bound server source:
mixup of two smoothed uniform-noise images at random scales (seeded, standard library only).
  scripts/fedtsa_noise.py OUT N"""
import random
import struct
import sys

out, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(0)


def blob(scale):
    """Uniform noise on a coarse grid of `scale`-pixel cells, bilinearly upsampled to 28x28."""
    g = 28 // scale + 2
    grid = [[rng.random() for _ in range(g)] for _ in range(g)]
    img = []
    for y in range(28):
        fy = y / scale
        y0, ty = int(fy), fy - int(fy)
        for x in range(28):
            fx = x / scale
            x0, tx = int(fx), fx - int(fx)
            top = grid[y0][x0] * (1 - tx) + grid[y0][x0 + 1] * tx
            bottom = grid[y0 + 1][x0] * (1 - tx) + grid[y0 + 1][x0 + 1] * tx
            img.append(top * (1 - ty) + bottom * ty)
    return img


with open(out, "wb") as f:
    f.write(struct.pack(">IIII", 0x803, n, 28, 28))
    for _ in range(n):
        a, b = blob(rng.choice([2, 4, 7])), blob(rng.choice([2, 4, 7]))
        lam = rng.random()
        f.write(bytes(int(255 * (lam * p + (1 - lam) * q)) for p, q in zip(a, b)))
