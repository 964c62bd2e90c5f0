"""Interleaved A/B of three ways to take 16 Hessian-vector products per pass in PyTorch, on the
model and batch of crosscheck.py: grad_outputs (PyHessian's way) with the biases frozen (as
crosscheck.py does), the same with the biases requiring gradients (as mixq's TorchScript model
leaves them), and the backward pass of the scalar Σ<g, v> (mixq's way before the grad_outputs
shim). Run from the repository root:

    OMP_NUM_THREADS=1 python experiments/pyhessian/pytorch_ab.py [--rounds 40]
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from crosscheck import load_digits_calib, weights_only  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tests/fixtures/tiny_cnn.pt")
    ap.add_argument("--digits", default="data/digits/digits.safetensors")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--k", type=int, default=16, help="products per pass")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = torch.jit.load(a.model)
    model.eval()
    x, y = load_digits_calib(a.digits)
    params = [p for _, p in weights_only(model)]
    biases = [p for n, p in model.named_parameters() if not (n.endswith(".weight") and p.dim() in (2, 4))]
    vs = [[torch.randint_like(p, high=2) * 2.0 - 1.0 for p in params] for _ in range(a.k)]

    def seeded(k):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        g = torch.autograd.grad(loss, params, create_graph=True)
        return [torch.autograd.grad(g, params, grad_outputs=vs[i], retain_graph=i + 1 < k) for i in range(k)]

    def dot(k):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        g = torch.autograd.grad(loss, params, create_graph=True)
        out = []
        for i in range(k):
            d = sum((gi * vi).sum() for gi, vi in zip(g, vs[i]))
            out.append(torch.autograd.grad(d, params, retain_graph=i + 1 < k))
        return out

    ways = {
        "grad_outputs, biases frozen": (seeded, False),
        "grad_outputs, biases requiring grad": (seeded, True),
        "Σ<g,v> backward, biases frozen": (dot, False),
    }
    times = {name: [] for name in ways}
    for r in range(a.rounds + 1):
        for name, (fn, bias_grad) in ways.items():
            for b in biases:
                b.requires_grad_(bias_grad)
            t0 = time.perf_counter()
            fn(a.k)
            if r > 0:  # round 0 warms up
                times[name].append((time.perf_counter() - t0) / a.k * 1e3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.k} products per pass, "
          f"{a.rounds} alternations, ms per product min / median:")
    for name, ts in times.items():
        print(f"  {name}: {min(ts):.2f} / {statistics.median(ts):.2f}")


if __name__ == "__main__":
    main()
