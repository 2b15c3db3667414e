#!/usr/bin/env python3
"""The recompute trade-off, measured: peak RSS and step time of the small preset (one process,
micro-batch 4) for each `train.recompute` setting, next to `kiln estimate`'s prediction. The
settings run in alternation, `--rounds` times, so the machine's drift hits each alike; the
figures are medians over rounds (step time: each run's median step). Prints a markdown table.

    python3 scripts/recompute_tradeoff.py [--kiln target/release/kiln] [--rounds 3] [--steps 6]
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = ["false", '"every:4"', '"every:2"', "true"]


def run(kiln, recompute, steps, out):
    sets = [
        f"train.recompute={recompute}",
        f"train.steps={steps}",
        "train.micro_batch=4",
        "train.global_batch=4",
        f"output.dir={out}",
    ]
    args = [kiln, "train", "--quiet", "--config", os.path.join(ROOT, "configs", "small.toml")]
    args += [a for s in sets for a in ("--set", s)]
    subprocess.run(args, check=True, env=dict(os.environ, KILN_LOG="error"))
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target", "release", "kiln"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    results = {s: [] for s in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="kiln-recompute-") as scratch:
        for r in range(args.rounds):
            for s in SETTINGS:
                out = os.path.join(scratch, f"{s.strip(chr(34)).replace(':', '')}-{r}")
                results[s].append(run(args.kiln, s, args.steps, out))
    base = statistics.median(x["median_step_ms"] for x in results["false"])
    print("| train.recompute | peak RSS (measured) | predicted | step time | vs no recompute |")
    print("|---|---|---|---|---|")
    for s in SETTINGS:
        peak = statistics.median(x["peak_rss_mb"] for x in results[s])
        predicted = results[s][0]["predicted_peak_rss_mb"]
        step = statistics.median(x["median_step_ms"] for x in results[s])
        print(f"| `{s}` | {peak:.0f} MiB | {predicted:.0f} MiB | {step:.0f} ms | {step / base:.2f}× |")


if __name__ == "__main__":
    main()
