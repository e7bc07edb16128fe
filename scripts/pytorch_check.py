#!/usr/bin/env python3
"""PyTorch twins of flotilla's models (see docs/pytorch.md), checked against flotilla's own logits.

Usage:
  python3 scripts/pytorch_check.py check DIR
      For each NAME.safetensors in DIR with a sibling NAME.check.safetensors (tensors `input`
      [n, C, H, W] and `logits` [n, classes] computed by flotilla), builds the module from the
      `model` metadata, loads it with strict=True and compares its logits with flotilla's.
      (`cargo run --release -p flotilla-models --example export_models -- DIR` writes such files.)
  python3 scripts/pytorch_check.py evaluate MODEL.safetensors [--data-dir DIR]
      Test accuracy and mean cross-entropy of a flotilla model on the Fashion-MNIST test set.

Needs torch, safetensors and numpy. The module definitions between the BEGIN/END MODULES
markers are the same code as in docs/pytorch.md; keep the two identical.
"""

import argparse
import gzip
import os
import sys

import numpy as np

# ---- BEGIN MODULES (identical to docs/pytorch.md) ----
import json
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def scaled(units, width):
    """Hidden width after the width multiplier: max(1, ceil(width * units))."""
    return max(1, math.ceil(units * width))


def group_norm(channels):
    """GroupNorm with the largest of 8, 4, 2, 1 groups that divides the channels."""
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-5)


class Cnn(nn.Module):
    """FedAvg CNN: conv5x5 'same' -> ReLU -> maxpool2 (x2), fc -> ReLU -> fc."""

    def __init__(self, input, classes, width=1.0):
        super().__init__()
        c, h, w = input
        c1, c2, f = scaled(32, width), scaled(64, width), scaled(512, width)
        self.conv1 = nn.Conv2d(c, c1, 5, stride=1, padding=2, bias=True)
        self.conv2 = nn.Conv2d(c1, c2, 5, stride=1, padding=2, bias=True)
        self.fc1 = nn.Linear(c2 * (h // 4) * (w // 4), f)
        self.fc2 = nn.Linear(f, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class Mlp(nn.Module):
    """ReLU MLP on flattened inputs; layers.0 ... layers.N (no ReLU after the last)."""

    def __init__(self, input, classes, width=1.0, hidden=(200, 200)):
        super().__init__()
        widths = [input[0] * input[1] * input[2]]
        widths += [scaled(h, width) for h in hidden]
        widths.append(classes)
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])
        )

    def forward(self, x):
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class BasicBlock(nn.Module):
    """conv3x3 -> GN -> ReLU -> conv3x3 -> GN, plus option-A shortcut, then ReLU."""

    def __init__(self, inp, out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(out)
        self.conv2 = nn.Conv2d(out, out, 3, stride=1, padding=1, bias=False)
        self.norm2 = group_norm(out)
        self.inp, self.out, self.stride = inp, out, stride

    def shortcut(self, x):
        """Parameter-free option A: x[:, :, ::2, ::2], then zero channels, extra // 2 in front."""
        if self.stride == 2:
            x = x[:, :, ::2, ::2]
        if self.out > self.inp:
            extra = self.out - self.inp
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x

    def forward(self, x):
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet-(6n+2) with GroupNorm; a skipped block runs only its shortcut."""

    def __init__(self, input, classes, width=1.0, blocks_per_stage=1):
        super().__init__()
        widths = [scaled(16, width), scaled(32, width), scaled(64, width)]
        self.conv1 = nn.Conv2d(input[0], widths[0], 3, stride=1, padding=1, bias=False)
        self.norm1 = group_norm(widths[0])
        blocks, inp = [], widths[0]
        for stage, out in enumerate(widths):
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(inp, out, stride))
                inp = out
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(widths[2], classes)

    def forward(self, x, active_blocks=None):
        x = F.relu(self.norm1(self.conv1(x)))
        for k, block in enumerate(self.blocks):
            active = active_blocks is None or active_blocks[k]
            x = block(x) if active else block.shortcut(x)
        return self.fc(x.mean(dim=(2, 3)))


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v and output projections."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        h, dh = self.heads, d // self.heads

        def split(t):
            return t.reshape(b, n, h, dh).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(2, 3) / math.sqrt(dh)
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class VitBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + fc2(gelu(fc1(norm2(x)))) (exact GELU)."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="none"))


class Vit(nn.Module):
    """Isotropic ViT: patch conv, class token first, learned positions, blocks, LayerNorm,
    head on the class token; a skipped block is the identity."""

    def __init__(self, input, classes, width=1.0, patch=7, dim=64, depth=4, heads=4,
                 mlp_ratio=2):
        super().__init__()
        c, h, w = input
        d = scaled(dim, width)
        tokens = (h // patch) * (w // patch) + 1
        self.patch_embed = nn.Conv2d(c, d, patch, stride=patch, padding=0, bias=True)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, d))
        self.blocks = nn.ModuleList(VitBlock(d, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(d, eps=1e-5)
        self.head = nn.Linear(d, classes)

    def forward(self, x, active_blocks=None):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, tokens - 1, d]
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for k, block in enumerate(self.blocks):
            if active_blocks is None or active_blocks[k]:
                x = block(x)
        return self.head(self.norm(x)[:, 0])


ARCHITECTURES = {"cnn": Cnn, "mlp": Mlp, "resnet": ResNet, "vit": Vit}


def build_from_spec(spec):
    """Builds the module for a ModelSpec (a dict, or the JSON string of the `model` metadata)."""
    if isinstance(spec, str):
        spec = json.loads(spec)
    spec = dict(spec)
    cls = ARCHITECTURES[spec.pop("arch")]
    return cls(**spec)


def load_flotilla(path):
    """Builds the model of a flotilla `model.safetensors` and loads it with strict=True."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
    if "model" not in metadata:
        raise ValueError(f"{path}: no `model` metadata, not a flotilla model file")
    spec = json.loads(metadata["model"])
    model = build_from_spec(spec)
    model.load_state_dict(load_file(path), strict=True)
    return model.eval(), spec
# ---- END MODULES ----

# Fashion-MNIST training-pixel mean and standard deviation, in [0, 1] units (as flotilla).
MEAN, STD = 0.2860, 0.3530


def normalise(pixels_u8):
    """uint8 pixels [n, 28, 28] -> float32 [n, 1, 28, 28]: (p / 255 - mean) / std."""
    x = pixels_u8.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return torch.from_numpy(x[:, None, :, :].copy())


def read_idx(path):
    """Reads an IDX file, gzipped or raw (also tries PATH.gz / PATH without .gz)."""
    candidates = [path, path[:-3] if path.endswith(".gz") else path + ".gz"]
    for p in candidates:
        if os.path.exists(p):
            with open(p, "rb") as f:
                raw = f.read()
            if raw[:2] == b"\x1f\x8b":
                raw = gzip.decompress(raw)
            break
    else:
        raise FileNotFoundError(f"none of {candidates} exists")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{p}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{p}: expected {dims} bytes of data, found {data.size}")
    return data.reshape(dims)


def cmd_check(directory):
    from safetensors.torch import load_file

    names = sorted(
        f[: -len(".safetensors")]
        for f in os.listdir(directory)
        if f.endswith(".safetensors") and not f.endswith(".check.safetensors")
    )
    checked, failed = 0, 0
    for name in names:
        check_path = os.path.join(directory, name + ".check.safetensors")
        if not os.path.exists(check_path):
            continue
        checked += 1
        try:
            model, spec = load_flotilla(os.path.join(directory, name + ".safetensors"))
            ref = load_file(check_path)
            with torch.no_grad():
                out = model(ref["input"])
            expected = ref["logits"]
            if out.shape != expected.shape:
                raise ValueError(f"logits shape {tuple(out.shape)}, expected {tuple(expected.shape)}")
            diff = (out - expected).abs().max().item()
            tol = 1e-4 * max(1.0, expected.abs().max().item())
            ok = diff < tol
        except Exception as e:  # report and go on with the other models
            print(f"{name}: FAIL ({type(e).__name__}: {e})")
            failed += 1
            continue
        arch = spec["arch"]
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {'ok' if ok else 'FAIL'}  arch={arch} params={params} "
              f"max_abs_diff={diff:.3e} tol={tol:.1e}")
        failed += not ok
    if checked == 0:
        print(f"no NAME.safetensors with a NAME.check.safetensors in {directory}")
        return 1
    print(f"{checked - failed} passed, {failed} failed")
    return 1 if failed else 0


def cmd_evaluate(model_path, data_dir, batch=1000):
    model, spec = load_flotilla(model_path)
    if list(spec["input"]) != [1, 28, 28]:
        print(f"the model takes input {spec['input']}, Fashion-MNIST is [1, 28, 28]")
        return 1
    images = read_idx(os.path.join(data_dir, "t10k-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data_dir, "t10k-labels-idx1-ubyte.gz"))
    x_all, y_all = normalise(images), torch.from_numpy(labels.astype(np.int64))
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for i in range(0, len(y_all), batch):
            x, y = x_all[i: i + batch], y_all[i: i + batch]
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=1) == y).sum().item()
    n = len(y_all)
    print(f"model: {json.dumps(spec)}")
    print(f"test_samples: {n}")
    print(f"test_accuracy: {correct / n:.4f}")
    print(f"test_loss: {loss_sum / n:.4f}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="compare PyTorch logits with flotilla's")
    p.add_argument("dir")
    p = sub.add_parser("evaluate", help="Fashion-MNIST test accuracy and loss")
    p.add_argument("model")
    p.add_argument("--data-dir", default=os.environ.get("FLOTILLA_DATA")
                   or "/usr/share/datasets/fashion-mnist",
                   help="folder of the IDX files (default: $FLOTILLA_DATA, else "
                   "/usr/share/datasets/fashion-mnist)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        if args.command == "check":
            return cmd_check(args.dir)
        return cmd_evaluate(args.model, args.data_dir)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        if isinstance(e, FileNotFoundError) and args.command == "evaluate":
            print("fix: pass --data-dir (or set FLOTILLA_DATA) to the folder holding "
                  "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
