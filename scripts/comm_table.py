#!/usr/bin/env python3
"""The README's collectives table: `kiln bench comm` at N = 2 and N = 3, alternating run by run.

    python3 scripts/comm_table.py --runs 7 [--kiln target/release/kiln] [--out DIR]

Each run prints, per operation and size, kiln's median time per call and the MPI library's own
call's on the same buffers (`--json`). A cell here is the median over runs of each run's ratio
(kiln ÷ MPI bus bandwidth), with the runs' range where it crosses 0.95. N = 3 oversubscribes a
2-core machine (`--oversubscribe --bind-to none`), so its second table splits its calls: time in
kiln's transport (`in call`) and time the calling thread spent off its core (`off core`, for
calls small enough to run on the caller's thread). Raw runs go to DIR as N<world>-<run>.json.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

SIZES_FROM = 64 << 10


def run_bench(kiln, world):
    cmd = ["mpirun", "-np", str(world)]
    if world > (os.cpu_count() or 1):
        cmd += ["--oversubscribe", "--bind-to", "none"]
    cmd += [kiln, "bench", "comm", "--json"]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out)


def size_label(b):
    return f"{b >> 20} MiB" if b >= 1 << 20 else f"{b >> 10} KiB"


def ratio_cell(ratios):
    cell = f"{statistics.median(ratios):.2f}"
    if min(ratios) < 0.95 <= max(ratios):
        cell += f" ({min(ratios):.2f}–{max(ratios):.2f})"
    return cell


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--out", default=None, help="where the raw runs go (default: a temp dir)")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="kiln-comm-")
    os.makedirs(out, exist_ok=True)
    runs = {2: [], 3: []}
    for i in range(args.runs):
        for world in (2, 3):
            rows = run_bench(args.kiln, world)
            runs[world].append(rows)
            with open(os.path.join(out, f"N{world}-{i}.json"), "w") as f:
                json.dump(rows, f)
            print(f"run {i + 1}/{args.runs}, N = {world} done", file=sys.stderr)

    ops = ["all_reduce", "reduce_scatter", "all_gather"]
    sizes = sorted({r["bytes"] for r in runs[2][0] if r["bytes"] >= SIZES_FROM})
    print(f"kiln ÷ MPI bus bandwidth, median of {args.runs} runs' ratios (raw runs: {out})\n")
    print("| op | N | " + " | ".join(size_label(s) for s in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for op in ops:
        for world in (2, 3):
            cells = []
            for s in sizes:
                ratios = [r["ratio"] for run in runs[world] for r in run
                          if r["op"] == op and r["bytes"] == s]
                cells.append(ratio_cell(ratios))
            print(f"| {op} | {world} | " + " | ".join(cells) + " |")

    print("\nN = 3, medians over runs of each run's median per call, µs: kiln (in its transport; "
          "off its core) vs MPI (off its core)\n")
    print("| op | size | kiln | in transport | off core | MPI | off core |")
    print("|---|---|---|---|---|---|---|")
    med = statistics.median
    for op in ops:
        for s in sizes:
            rows = [r for run in runs[3] for r in run if r["op"] == op and r["bytes"] == s]
            in_call = [r["kiln_in_call_s"] for r in rows if r["kiln_in_call_s"] is not None]
            off = [r["kiln_off_cpu_s"] for r in rows if r["kiln_off_cpu_s"] is not None]
            us = lambda v: f"{max(med(v), 0.0) * 1e6:.0f}" if v else "–"
            print(f"| {op} | {size_label(s)} | {us([r['kiln_s'] for r in rows])} | {us(in_call)} "
                  f"| {us(off)} | {us([r['reference_s'] for r in rows])} "
                  f"| {us([r['reference_off_cpu_s'] for r in rows])} |")


if __name__ == "__main__":
    main()
