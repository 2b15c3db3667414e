#!/usr/bin/env python3
"""Issue 14's matrix: `kiln estimate`'s predicted peak RSS against the measured peak (VmHWM,
summary.json's peak_rss_mb) of the same run, for tiny and small × stages 0-3 × offload
none/nvme × recompute off/on/every:2 × N = 1, 2, 4 local ranks (--simulate), plus a subset
under mpirun. Prints a markdown table (the README's) and exits 1 when a run is outside ±10%.

Each run is its own process (VmHWM is per process). Runs go `--jobs` at a time: resident sets
do not disturb each other while the machine has memory to spare; only step times do.

    python3 scripts/memory_matrix.py [--kiln target/release/kiln] [--jobs 2] [--quick]

`--raw FILE` keeps each run (scripts/memory_fit.py refits the estimate's coefficients to such
files; scripts/memory_runs.jsonl holds the runs of the current fit) and `--from FILE` re-predicts
kept runs with the current binary, training nothing.
"""
import argparse
import concurrent.futures as cf
import itertools
import json
import os
import subprocess
import sys
import tempfile

# The models: a preset's config file, the micro-batch and shape overrides. tiny at micro-batch 4
# is activation-bound, small at 1 model-state-bound (and 4× quicker than at 4, which keeps the
# matrix to minutes on two cores). The other shapes (`--models wide,vocab,long,deep,gpt2`) move
# one term at a time, so that a fit over them does not mistake one term for another.
RAW = None
MODELS = {
    "tiny": ("tiny", 4, []),
    "small": ("small", 1, []),
    "wide": ("tiny", 1, ["model.d_model=1024", "model.n_heads=8"]),
    "vocab": ("tiny", 4, ["model.vocab=8192"]),
    "long": ("tiny", 1, ["model.max_seq_len=512", "model.n_heads=8"]),
    "deep": ("tiny", 2, ["model.n_layers=12", "model.d_model=128", "model.n_heads=2"]),
    "gpt2": ("tiny", 1, ['model.preset="gpt2-124m"', "model.max_seq_len=256"]),
}
MICRO_BATCH = {name: micro for name, (_, micro, _) in MODELS.items()}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def case_args(case, scratch):
    """The config file and `--set` arguments of one case."""
    model, stage, tier, recompute, n, launch = case
    tag = f"{model}-s{stage}-{tier}-{recompute.replace(':', '')}-n{n}-{launch}"
    out = os.path.join(scratch, tag)
    sets = [
        f"parallel.stage={stage}",
        f"offload.optimizer={tier}",
        f"offload.nvme_path={scratch}",
        f"train.recompute={recompute}" if recompute != "every:2" else 'train.recompute="every:2"',
        "train.steps=2",
        f"train.micro_batch={MICRO_BATCH[model]}",
        f"train.global_batch={MICRO_BATCH[model] * n}",
        f"output.dir={out}",
    ] + MODELS[model][2]
    config = os.path.join(ROOT, "configs", f"{MODELS[model][0]}.toml")
    set_args = [a for s in sets for a in ("--set", s)]
    return config, set_args, out


def estimate(kiln, case, scratch):
    """`kiln estimate --json` for the launch of `case`."""
    config, set_args, _ = case_args(case, scratch)
    n, launch = case[4], case[5]
    args = [kiln, "estimate", "--json", "--config", config, "--world", str(n)] + set_args
    if launch == "simulate":
        args.append("--simulate")
    env = dict(os.environ, KILN_LOG="error")
    return json.loads(subprocess.run(args, check=True, capture_output=True, env=env).stdout)


def run_one(kiln, case, scratch):
    model, stage, tier, recompute, n, launch = case
    config, set_args, out = case_args(case, scratch)
    train = [kiln, "train", "--quiet", "--config", config] + set_args
    env = dict(os.environ, KILN_LOG="error")
    if launch == "simulate":
        train += ["--simulate", str(n)]
    else:
        train = ["mpirun", "--oversubscribe", "-np", str(n)] + train
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    est = estimate(kiln, case, scratch)
    r = subprocess.run(train, capture_output=True, env=env, text=True)
    if r.returncode != 0:
        return case, None, None, r.stderr.strip().splitlines()[-1:]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    predicted = est["configured"]["predicted_peak_rss_bytes"] / 2**20
    if RAW:
        with open(RAW, "a") as f:
            # What scripts/memory_fit.py reads: the configured run's states and the measured peak.
            run = {
                "case": case,
                "estimate": {"configured": est["configured"]},
                "summary": {"peak_rss_mb": summary["peak_rss_mb"]},
            }
            f.write(json.dumps(run) + "\n")
    return case, predicted, summary["peak_rss_mb"], None


def repredict(kiln, recorded, scratch):
    """The runs of a --raw file, each with the current estimate next to its measured peak."""
    with open(recorded) as f:
        for line in f:
            run = json.loads(line)
            case = tuple(run["case"])
            est = estimate(kiln, case, scratch)
            predicted = est["configured"]["predicted_peak_rss_bytes"] / 2**20
            yield case, predicted, run["summary"]["peak_rss_mb"], None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target", "release", "kiln"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny only, N = 1 and 2")
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--tiers", default="none,nvme")
    ap.add_argument("--recompute", default="false,true,every:2")
    ap.add_argument("--launch", default="simulate,mpirun", help="simulate and/or mpirun")
    ap.add_argument(
        "--raw", help="append each run's case, estimate and measured peak to this JSON-lines file"
    )
    ap.add_argument(
        "--from",
        dest="recorded",
        help="train nothing: re-predict the runs of a --raw file with this binary's estimate",
    )
    args = ap.parse_args()
    global RAW
    RAW = args.raw
    if args.quick:
        args.models, args.worlds = "tiny", "1,2"
    models = args.models.split(",")
    worlds = [int(n) for n in args.worlds.split(",")]
    stages = [int(s) for s in args.stages.split(",")]
    launches = args.launch.split(",")
    cases = []
    if "simulate" in launches:
        cases += [
            (m, s, t, r, n, "simulate")
            for m, s, t, r, n in itertools.product(
                models, stages, args.tiers.split(","), args.recompute.split(","), worlds
            )
        ]
    if "mpirun" in launches:
        cases += [(m, s, "none", "false", 2, "mpirun") for m in models for s in stages]
    rows, bad = [], 0
    with tempfile.TemporaryDirectory(prefix="kiln-matrix-") as scratch:
        if args.recorded:
            rows = list(repredict(args.kiln, args.recorded, scratch))
        else:
            with cf.ThreadPoolExecutor(args.jobs) as pool:
                for row in pool.map(lambda c: run_one(args.kiln, c, scratch), cases):
                    rows.append(row)
                    print(*row[:3], row[3] or "", file=sys.stderr, flush=True)
    print("| model | stage | offload | recompute | ranks | launch | predicted MiB | measured MiB | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    errors = []
    for (m, s, t, r, n, launch), predicted, measured, err in rows:
        if err:
            bad += 1
            print(f"| {m} | {s} | {t} | {r} | {n} | {launch} | failed: {err} | | |")
            continue
        e = predicted / measured - 1
        errors.append(abs(e))
        bad += abs(e) > 0.10
        print(f"| {m} | {s} | {t} | {r} | {n} | {launch} | {predicted:.0f} | {measured:.0f} | {e:+.1%} |")
    if errors:
        print(
            f"\n{len(errors)} runs; |error| median {sorted(errors)[len(errors) // 2]:.1%}, "
            f"max {max(errors):.1%}; {bad} outside ±10%"
        )
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
