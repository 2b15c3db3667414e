#!/usr/bin/env python3
"""Refits the coefficients of kiln's memory estimate (src/memory/estimate.rs) to measured runs.

Input: JSON-lines files written by `scripts/memory_matrix.py --raw FILE` (each run's case,
`kiln estimate --json` and summary.json). The model is the estimate module's: model states
exactly as kiln reports them; at the moment of backward that holds the most, the autodiff graphs
(23·t·d + h·t² floats per block, 4.75·t·V for the head, per sequence) and the parameter
tensors those graphs hold (ZeRO-3's regathered units hold only the running unit's); the model's
parameter bytes once per rank; a constant per rank, per process, and for a launcher's MPI
library. Weighted least squares on the relative error.
Prints the coefficients, the errors, the worst runs, and a leave-one-shape-out check.
Needs numpy (e.g. the scratch virtualenv of scripts/torch_gpt.py).

    python scripts/memory_fit.py RUNS.jsonl [MORE.jsonl ...]
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from memory_matrix import MODELS  # noqa: E402

MIB = 2**20
# Preset shapes (src/model/gpt.rs): vocab, d_model, n_layers, n_heads, max_seq_len.
PRESETS = {
    "tiny": (256, 256, 4, 4, 128),
    "small": (256, 512, 8, 8, 256),
    "gpt2-124m": (50304, 768, 12, 12, 1024),
}
KEYS = ["vocab", "d_model", "n_layers", "n_heads", "max_seq_len"]
COLUMNS = ["process", "launcher", "rank", "activations", "params_in_graphs", "whole_model"]


def shape(model):
    """The model's shape: its config's preset with memory_matrix's overrides applied."""
    config, micro, sets = MODELS[model]
    preset = config
    for s in sets:
        if s.startswith("model.preset="):
            preset = s.split("=", 1)[1].strip('"')
    values = dict(zip(KEYS, PRESETS[preset]))
    for s in sets:
        key, value = s.split("=", 1)
        if key.removeprefix("model.") in values:
            values[key.removeprefix("model.")] = int(value)
    return values, micro


def backwards(stage, recompute, layers):
    """What each unit's backward starts from (src/memory/estimate.rs `unit_backwards`): "kept",
    "recomputed" (train.recompute), or under ZeRO-3 with the default reshard_after_forward
    "regathered" (graph without its matrices), the embedding "recomputed". No unit is
    persistent: the matrix runs keep parallel.persist_threshold at its default, 0."""
    units = layers + 2
    if recompute == "true":
        flags = [True] * units
    elif recompute.startswith("every:"):
        k = int(recompute.split(":")[1])
        flags = [False] + [i % k == 0 for i in range(layers)] + [False]
    else:
        flags = [False] * units
    if stage != 3:
        return ["recomputed" if f else "kept" for f in flags]
    return ["recomputed" if f or u == 0 else "regathered" for u, f in enumerate(flags)]


def features(run, act_weight=0.89, par_weight=0.64):
    model, stage, _tier, recompute, n, launch = run["case"]
    m, b = shape(model)
    V, d, L, h, t = (m[k] for k in KEYS)
    unit_params = [V * d + t * d] + [12 * d * d + 13 * d] * L + [2 * d + d * V]
    graph = [0.0] + [23 * t * d + h * t * t] * L + [4.75 * t * V]
    kept_act = kept_par = 0.0
    worst = (0.0, 0.0)
    for u, kind in enumerate(backwards(stage, recompute, L)):
        if kind == "recomputed":
            kept_act += 4 * b * t * d
            held = (kept_act + 4 * b * graph[u], kept_par + 4 * unit_params[u])
        elif kind == "regathered":
            kept_act += 4 * b * graph[u]
            held = (kept_act, kept_par + 4 * unit_params[u])
        else:
            kept_act += 4 * b * graph[u]
            kept_par += 4 * unit_params[u]
            held = (kept_act, kept_par)
        if act_weight * held[0] + par_weight * held[1] > act_weight * worst[0] + par_weight * worst[1]:
            worst = held
    c = run["estimate"]["configured"]
    kinds = ["params_bytes", "grads_bytes", "optimizer_bytes", "comm_buffers_bytes", "gathered_bytes"]
    ranks = n if launch == "simulate" else 1
    return {
        "case": run["case"],
        "model": model,
        "measured": run["summary"]["peak_rss_mb"],
        "states": ranks * sum(c[k] for k in kinds) / MIB,
        "process": 1.0,
        "launcher": float(launch == "mpirun"),
        "rank": float(ranks),
        "activations": ranks * worst[0] / MIB,
        "params_in_graphs": ranks * worst[1] / MIB,
        "whole_model": ranks * 4 * sum(unit_params) / MIB,
    }


def solve(rows):
    X = np.array([[r[c] for c in COLUMNS] for r in rows])
    m = np.array([r["measured"] for r in rows])
    y = m - np.array([r["states"] for r in rows])
    w = 1 / m
    coef, *_ = np.linalg.lstsq(X * w[:, None], y * w, rcond=None)
    return coef


def errors(rows, coef):
    return np.array(
        [(r["states"] + sum(c * r[k] for c, k in zip(coef, COLUMNS))) / r["measured"] - 1 for r in rows]
    )


def main():
    runs = [json.loads(line) for f in sys.argv[1:] for line in open(f)]
    runs = [r for r in runs if r.get("summary")]
    rows = [features(r) for r in runs]
    coef = solve(rows)
    # The moment that holds the most depends on the weights: refit once with the fitted ones.
    rows = [features(r, coef[3], coef[4]) for r in runs]
    coef = solve(rows)
    err = errors(rows, coef)
    units = ["MiB", "MiB", "MiB", "×", "×", "×"]
    for name, c, u in zip(COLUMNS, coef, units):
        print(f"{name:>17} {c:8.3f} {u}")
    a = np.abs(err)
    print(f"{len(rows)} runs: |error| median {np.median(a):.1%}, max {a.max():.1%}, {(a > 0.10).sum()} outside ±10%")
    for r, e in sorted(zip(rows, err), key=lambda z: -abs(z[1]))[:5]:
        print(f"  {r['case']}: measured {r['measured']:.0f} MiB, {e:+.1%}")
    print("leave one shape out (refit without it, predict it):")
    for model in sorted({r["model"] for r in rows}):
        rest = [r for r in rows if r["model"] != model]
        held = [r for r in rows if r["model"] == model]
        worst = np.abs(errors(held, solve(rest))).max()
        print(f"  {model:>6}: max |error| {worst:.1%} over {len(held)} runs")


if __name__ == "__main__":
    main()
