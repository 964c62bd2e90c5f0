"""PyHessian cross-check of mixq's Hessian traces, and per-HVP timing in PyTorch.

Called by run.sh after `mixq sensitivity` has written its report; this is the reference side of
the comparison, so it computes everything with PyTorch and PyHessian only and reads mixq's numbers
from the report:

1. the same model (the TorchScript fixture) and the same data (the embedded UCI digits, split
   `calib`, read from data/digits/digits.safetensors exactly as mixq reads it: x / 16, [N, 1, 8, 8],
   int64 labels), mean cross-entropy, one batch;
2. the exact Hessian of the loss w.r.t. the four quantizable weights (6,152 rows by autograd), its
   per-layer traces and the exact variance of a Rademacher Hutchinson sample of the total,
   2 * sum_{a != b} H_ab^2;
3. PyHessian's `hessian.trace` with a fixed number of probes (tol = -inf, so its running-mean rule
   never fires) on the same weights (biases set to requires_grad = False, so PyHessian's
   parameter list is exactly mixq's layer weights); its standard error from its per-probe samples;
4. wall time per Hessian-vector product: a full product (forward, backward with create_graph,
   double backward), and PyHessian's product on its cached gradient (double backward only).

Prints a plain-text report and writes results.json next to the mixq report.
"""

import argparse
import json
import math
import os
import statistics
import struct
import time
import warnings

import numpy as np
import torch
from pyhessian import hessian

# PyHessian calls loss.backward(create_graph=True), which PyTorch warns about; harmless here.
warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph")


def load_digits_calib(path):
    """The `calib` split of data/digits/digits.safetensors, as mixq::model::data::Dataset::digits."""
    raw = open(path, "rb").read()
    (hlen,) = struct.unpack_from("<Q", raw, 0)
    header = json.loads(raw[8 : 8 + hlen])
    body = raw[8 + hlen :]

    def get(name):
        meta = header[name]
        assert meta["dtype"] == "U8", meta
        a, b = meta["data_offsets"]
        return np.frombuffer(body[a:b], dtype=np.uint8).reshape(meta["shape"])

    x, y, split = get("x"), get("y"), get("split")
    idx = np.nonzero(split == 1)[0]
    x = torch.from_numpy(x[idx].astype(np.float32)) / 16.0
    y = torch.from_numpy(y[idx].astype(np.int64))
    return x.reshape(-1, 1, 8, 8), y


def weights_only(model):
    """(name, tensor) of rank-2/4 `.weight` parameters (mixq's layers); freezes all others."""
    out = []
    for name, p in model.named_parameters():
        if name.endswith(".weight") and p.dim() in (2, 4):
            p.requires_grad_(True)
            out.append((name[: -len(".weight")], p))
        else:
            p.requires_grad_(False)
    return out


def exact_hessian(model, x, y, params):
    """Dense Hessian of the mean cross-entropy w.r.t. `params` (float64), one unit-vector
    product per row on the cached gradient graph."""
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    rows = []
    for i, p in enumerate(params):
        for k in range(p.numel()):
            e = [torch.zeros_like(q) for q in params]
            e[i].view(-1)[k] = 1.0
            r = torch.autograd.grad(grads, params, grad_outputs=e, retain_graph=True)
            rows.append(torch.cat([t.reshape(-1) for t in r]).double())
    h = torch.stack(rows)
    return (h + h.T) / 2


def time_it(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), statistics.median(ts)


def hvp_timing(model, x, y, params, hc, reps):
    """Wall time per HVP in PyTorch: k products per pass (k = 1, 4, 16) and PyHessian's cached product."""
    vs = [[torch.randint_like(p, high=2) * 2.0 - 1.0 for p in params] for _ in range(16)]

    def full_hvps(k):
        """k products sharing one forward pass and first backward (k = 1: a plain full product)."""
        loss = torch.nn.functional.cross_entropy(model(x), y)
        g = torch.autograd.grad(loss, params, create_graph=True)
        return [torch.autograd.grad(g, params, grad_outputs=vs[i], retain_graph=i + 1 < k) for i in range(k)]

    def cached_hvp():
        return torch.autograd.grad(hc.gradsH, hc.params, grad_outputs=vs[0], only_inputs=True, retain_graph=True)

    timing = {}
    print()
    print(f"PyTorch wall time per HVP, {reps} reps, min / median per product:")
    for k in (1, 4, 16):
        mn, md = time_it(lambda: full_hvps(k), reps)
        timing[f"{k}_per_pass"] = {"min_ms": mn / k * 1e3, "median_ms": md / k * 1e3}
        what = "forward + backward + double backward" if k == 1 else "sharing forward and first backward"
        print(f"  {k:>2} probe(s) per pass ({what}): {mn / k * 1e3:.2f} / {md / k * 1e3:.2f} ms")
    mn, md = time_it(cached_hvp, reps)
    timing["pyhessian_cached"] = {"min_ms": mn * 1e3, "median_ms": md * 1e3}
    print(f"  PyHessian's product on its cached gradient (double backward only): {mn * 1e3:.2f} / {md * 1e3:.2f} ms")
    return timing


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--digits", required=True, help="data/digits/digits.safetensors")
    ap.add_argument("--mixq-report", help="the report of `mixq sensitivity` (not needed with --timing-only)")
    ap.add_argument("--probes", type=int, default=2000, help="PyHessian Hutchinson probes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing-reps", type=int, default=30)
    ap.add_argument("--out", help="results.json (not needed with --timing-only)")
    ap.add_argument("--timing-only", action="store_true", help="only the PyTorch HVP timing (no traces, no results.json)")
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    model = torch.jit.load(a.model)
    model.eval()
    x, y = load_digits_calib(a.digits)
    named = weights_only(model)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    sizes = [p.numel() for p in params]
    if a.timing_only:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        hc = hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        hvp_timing(model, x, y, params, hc, a.timing_reps)
        return
    if not (a.mixq_report and a.out):
        ap.error("--mixq-report and --out are required unless --timing-only")
    rep = json.load(open(a.mixq_report))
    assert rep["format"] == "mixq.sensitivity-report" and rep["version"] == 1, "unknown mixq report"
    mixq_layers = {l["name"]: l for l in rep["layers"]}
    assert names == [l["name"] for l in rep["layers"]], (names, list(mixq_layers))
    mixq_probes = rep["settings"]["probes"]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {a.model}; data digits:calib, {len(y)} samples")
    print(f"layers: {', '.join(f'{n} ({s})' for n, s in zip(names, sizes))}; {sum(sizes)} weights")

    # -- exact Hessian -----------------------------------------------------------------------
    t0 = time.perf_counter()
    h = exact_hessian(model, x, y, params)
    t_exact = time.perf_counter() - t0
    off = np.cumsum([0] + sizes)
    exact_layer = [h[off[i] : off[i + 1], off[i] : off[i + 1]].trace().item() for i in range(len(sizes))]
    exact_total = sum(exact_layer)
    var_total = 2.0 * ((h**2).sum() - (h.diagonal() ** 2).sum()).item()
    print(f"exact Hessian ({h.shape[0]} rows) in {t_exact:.1f} s: total trace {exact_total:.6e}, "
          f"Rademacher sample std of the total {math.sqrt(var_total):.4e}")

    # -- PyHessian -----------------------------------------------------------------------------
    torch.manual_seed(a.seed)
    hc = hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    assert len(hc.params) == len(params)
    t0 = time.perf_counter()
    samples = hc.trace(maxIter=a.probes, tol=float("-inf"))
    t_ph = time.perf_counter() - t0
    assert len(samples) == a.probes
    ph_mean = float(np.mean(samples))
    ph_se = float(np.std(samples, ddof=1) / math.sqrt(len(samples)))

    # -- mixq -------------------------------------------------------------------------------------
    mq_total = sum(mixq_layers[n]["trace"] for n in names)
    se_layers = [mixq_layers[n]["trace_std_err"] for n in names]
    mq_se_indep = math.sqrt(sum(s * s for s in se_layers))  # layers' samples treated as independent
    mq_se_bound = sum(se_layers)  # Cauchy-Schwarz bound, any correlation
    mq_se_exact = math.sqrt(var_total / mixq_probes)  # from the exact Hessian

    print()
    print(f"per-layer traces: mixq ({mixq_probes} probes) against the exact Hessian")
    print(f"  {'layer':<14}{'exact':>13}{'mixq':>13}{'mixq s.e.':>11}{'z':>7}")
    z_layers = []
    for n, e in zip(names, exact_layer):
        l = mixq_layers[n]
        z = (l["trace"] - e) / l["trace_std_err"]
        z_layers.append(z)
        print(f"  {n:<14}{e:>13.5e}{l['trace']:>13.5e}{l['trace_std_err']:>11.2e}{z:>7.2f}")
    print()
    print("total trace (sum over the four layers)")
    print(f"  exact                         {exact_total:.5e}")
    print(f"  PyHessian ({a.probes} probes)        {ph_mean:.5e} ± {ph_se:.2e} (s.e.)  z vs exact {(ph_mean - exact_total) / ph_se:+.2f}")
    print(f"  mixq ({mixq_probes} probes)             {mq_total:.5e} ± {mq_se_exact:.2e} (s.e. from the exact Hessian; "
          f"√Σse²={mq_se_indep:.2e}, Σse={mq_se_bound:.2e})  z vs exact {(mq_total - exact_total) / mq_se_exact:+.2f}")
    comb = math.sqrt(mq_se_exact**2 + ph_se**2)
    comb_indep = math.sqrt(mq_se_indep**2 + ph_se**2)
    z_mp = (mq_total - ph_mean) / comb
    print(f"  mixq − PyHessian = {mq_total - ph_mean:+.3e} = {z_mp:+.2f} combined s.e. ({comb:.2e}); "
          f"{(mq_total - ph_mean) / comb_indep:+.2f} with mixq's √Σse² ({comb_indep:.2e})")

    timing = hvp_timing(model, x, y, params, hc, a.timing_reps)
    print(f"  PyHessian trace loop: {t_ph / a.probes * 1e3:.2f} ms per probe ({a.probes} probes in {t_ph:.1f} s)")

    out = {
        "format": "mixq.experiment.pyhessian",
        "version": 1,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "samples": len(y),
        "layers": names,
        "exact_layer_traces": exact_layer,
        "exact_total": exact_total,
        "rademacher_total_sample_var": var_total,
        "pyhessian": {"probes": a.probes, "total": ph_mean, "std_err": ph_se, "seconds": t_ph},
        "mixq": {"probes": mixq_probes, "total": mq_total, "std_err_exact": mq_se_exact, "std_err_indep": mq_se_indep,
                 "layer_z_vs_exact": z_layers},
        "mixq_minus_pyhessian_in_combined_se": z_mp,
        "pytorch_hvp_ms": timing,
    }
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
