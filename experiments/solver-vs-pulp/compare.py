"""Solves the instances mixq solved with PuLP + CBC and prints the side-by-side table.

The 0/1 program is the one mixq solves: a binary per layer and format, one format per layer,
Σ resource ≤ limit per budget, minimize Σ cost. The limits are the absolute ones mixq resolved
from the relative budgets (read from mixq's JSON), so both solve the same instance. Times are the
best and the median of the repeats: mixq's solver time as it reports it (`time_s`, table parsing
excluded) and the whole `mixq allocate` process; PuLP's `solve()` call (CBC included, model
building excluded) and the model building.
"""

import csv
import glob
import json
import statistics
import sys
import time

import pulp

RESOURCE_COLUMN = {"size": "bytes", "bops": "bops", "latency": "latency_us", "avg-bits": "bits"}


def load_table(path):
    layers = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            layers.setdefault(row["layer"], []).append(row)
    return layers


def solve_pulp(layers, budgets):
    t0 = time.perf_counter()
    prob = pulp.LpProblem("mixq", pulp.LpMinimize)
    x = {}
    for li, (name, opts) in enumerate(layers.items()):
        for oi, _ in enumerate(opts):
            x[li, oi] = pulp.LpVariable(f"x_{li}_{oi}", cat="Binary")
    items = [(li, oi, o) for li, opts in enumerate(layers.values()) for oi, o in enumerate(opts)]
    prob += pulp.lpSum(float(o["cost"]) * x[li, oi] for li, oi, o in items)
    for li, opts in enumerate(layers.values()):
        prob += pulp.lpSum(x[li, oi] for oi in range(len(opts))) == 1
    for b in budgets:
        col = RESOURCE_COLUMN[b["resource"]]
        prob += pulp.lpSum(float(o[col]) * x[li, oi] for li, oi, o in items) <= b["limit"]
    t1 = time.perf_counter()
    status = prob.solve(pulp.PULP_CBC_CMD(msg=0))
    t2 = time.perf_counter()
    objective = sum(float(o["cost"]) for li, oi, o in items if x[li, oi].value() > 0.5)
    return pulp.LpStatus[status], objective, t2 - t1, t1 - t0


def main():
    out, repeats, cases = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    layers = load_table(f"{out}/synthetic-s1-2000x8.csv")
    print(f"instance: mixq synthetic --seed 1 --layers 2000 --formats 8 ({len(layers)} layers, "
          f"{sum(len(v) for v in layers.values())} options); pulp {pulp.__version__}, CBC via PULP_CBC_CMD")
    print(f"{'case':<22} {'budgets':<34} {'mixq obj':>14} {'gap':>8} {'CBC obj':>14} {'rel diff':>9} "
          f"{'mixq solve ms':>14} {'mixq process ms':>16} {'CBC solve ms':>13} {'speed-up':>9}")
    rows = []
    for case in cases:
        runs = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/{case}.mixq.*.json"))]
        walls = []
        for p in sorted(glob.glob(f"{out}/{case}.mixq.*.wall")):
            t0, t1 = map(float, open(p).read().split())
            walls.append(t1 - t0)
        a = runs[0]
        budgets = a["budgets"]
        # Repeat CBC only while it is quick (the binding three-budget case takes CBC minutes).
        pulp_runs = [solve_pulp(layers, budgets)]
        while len(pulp_runs) < repeats and pulp_runs[0][2] < 30:
            pulp_runs.append(solve_pulp(layers, budgets))
        status, cbc_obj = pulp_runs[0][0], pulp_runs[0][1]
        mixq_s = [r["time_s"] for r in runs]
        cbc_s = [r[2] for r in pulp_runs]
        rel = abs(a["objective"] - cbc_obj) / max(abs(cbc_obj), 1e-300)
        bstr = " ".join(b["budget"] for b in budgets)
        speed = min(cbc_s) / min(mixq_s)
        print(f"{case:<22} {bstr:<34} {a['objective']:>14.9g} {a['gap']:>8.1e} {cbc_obj:>14.9g} {rel:>9.1e} "
              f"{1e3 * min(mixq_s):>6.1f}/{1e3 * statistics.median(mixq_s):<7.1f} "
              f"{1e3 * min(walls):>7.0f}/{1e3 * statistics.median(walls):<8.0f} "
              f"{1e3 * min(cbc_s):>6.0f}/{1e3 * statistics.median(cbc_s):<6.0f} {speed:>8.0f}x")
        if status != "Optimal":
            print(f"  CBC status {status}")
        agree = rel <= max(a["gap"], 1e-7)
        print(f"  objectives agree: {'yes' if agree else 'NO'} (relative difference {rel:.1e}); "
              f"model building in PuLP {1e3 * statistics.median(r[3] for r in pulp_runs):.0f} ms (median)")
        rows.append((case, bstr, a["objective"], a["gap"], cbc_obj, min(mixq_s), statistics.median(mixq_s),
                     min(walls), statistics.median(walls), min(cbc_s), statistics.median(cbc_s)))
    with open(f"{out}/solver-vs-pulp.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "budgets", "mixq_objective", "mixq_gap", "cbc_objective", "mixq_solve_min_s", "mixq_solve_median_s",
                    "mixq_process_min_s", "mixq_process_median_s", "cbc_solve_min_s", "cbc_solve_median_s"])
        w.writerows(rows)
    print("(times: best/median of the repeats; solve = the solver alone, process = the whole mixq allocate run)")


if __name__ == "__main__":
    main()
