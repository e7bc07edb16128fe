#!/usr/bin/env python3
"""PyTorch eager reference for `flotilla bench`: W1 CNN training and evaluation speed.

Never run in CI. Usage (torch installed, e.g. `pip install torch`):
    python3 bench/pytorch_w1.py --batch 32 --samples 3200 [--threads 2] [--runs 3]
`flotilla bench` runs it itself when FLOTILLA_TORCH_PYTHON names that Python, so both are
measured in the same run. Prints `train_samples_per_s`, `eval_samples_per_s` (the best of
`--runs` timed runs each, as flotilla's bench reports), the peak RSS, and the speed of a
2048×2048 torch.matmul on the same threads (`matmul_flops_per_s`: the machine's peak measured
by torch's BLAS, independent of flotilla's GEMM).
"""
import argparse
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class FedAvgCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(3136, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--samples", type=int, default=3200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = FedAvgCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(a.samples, 1, 28, 28)
    y = torch.randint(0, 10, (a.samples,))

    def epoch(n):
        for i in range(0, n, a.batch):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[i:i + a.batch]), y[i:i + a.batch])
            loss.backward()
            opt.step()

    epoch(a.batch)  # warm-up
    train = 0.0
    for _ in range(a.runs):
        t = time.perf_counter()
        epoch(a.samples)
        train = max(train, a.samples / (time.perf_counter() - t))
    model.eval()
    xe = torch.randn(10000, 1, 28, 28)
    with torch.no_grad():
        model(xe[:100])
        evals = 0.0
        for _ in range(a.runs):
            t = time.perf_counter()
            for i in range(0, 10000, 1000):
                model(xe[i:i + 1000])
            evals = max(evals, 10000 / (time.perf_counter() - t))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    mm = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        mm = max(mm, 2 * n**3 / (time.perf_counter() - t))
    print(f"train_samples_per_s: {train:.1f}")
    print(f"eval_samples_per_s: {evals:.1f}")
    print(f"peak_rss_bytes: {rss}")
    print(f"matmul_flops_per_s: {mm:.0f}")


if __name__ == "__main__":
    main()
