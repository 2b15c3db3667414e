#!/usr/bin/env python3
"""QLoRA's NF4 held to bitsandbytes (issue 29). The output is committed, so CI needs neither.

  python scripts/make_nf4_fixture.py
      tests/fixtures/nf4/bnb.json: a random torch Linear weight [out 32, in 64] (a few blocks
      with outliers and one all-zero block), bitsandbytes' `quantize_4bit(quant_type="nf4",
      blocksize=64)` of it — the packed codes and the per-block absmax — its
      `dequantize_4bit`, and the NF4 levels bitsandbytes uses. src/api/nf4.rs's test holds
      kiln's encoding of the same weight (burn's [in, out] layout) to them byte for byte.

bitsandbytes is not a dependency of kiln: install it into a scratch virtualenv
(/tmp/venv-hf/bin/pip install bitsandbytes torch).
"""
import json, os
import torch
import bitsandbytes
import bitsandbytes.functional as F

torch.manual_seed(5)
w = torch.randn(32, 64) * 0.1
w[3, 10] = 2.5          # an outlier: its block's levels are coarse
w[7, :] = 0.0           # an all-zero block
q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
back = F.dequantize_4bit(q, state)
out = {
    "about": f"made by scripts/make_nf4_fixture.py with bitsandbytes {bitsandbytes.__version__}, torch {torch.__version__}",
    "shape_out_in": list(w.shape),
    "weight": w.flatten().tolist(),
    "packed": q.flatten().tolist(),
    "absmax": state.absmax.flatten().tolist(),
    "dequantized": back.flatten().tolist(),
    "levels": F.get_4bit_type("nf4", device="cpu").tolist(),
}
path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "nf4", "bnb.json")
with open(path, "w") as f:
    json.dump(out, f)
    f.write("\n")
print("max |w - dequantized|:", (w - back).abs().max().item())
