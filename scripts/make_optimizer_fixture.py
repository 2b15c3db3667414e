#!/usr/bin/env python3
"""The optimizers of issue 28 held to independent references. The output is committed, so CI
needs no torch: tests/fixtures/optimizers.json, read by tests/optimizers.rs.

  python scripts/make_optimizer_fixture.py --kiln target/release/kiln

  adamw8bit: bitsandbytes' own AdamW8bit (its CPU kernel, with its pure-PyTorch nearest-code
             quantizer in place of the C one: see nearest_quantize; min_8bit_size=0 so that the
             one tensor is quantized) run for STEPS_8BIT steps on a 1,024-element parameter (four blocks of
             256, whose gradients are scaled by 1, 2^-2, 2^-4, 2^-6 so the blocks' maxima
             differ) with gradients from a 32-bit LCG that tests/optimizers.rs regenerates bit
             for bit; recorded: bitsandbytes' two dynamic codes (create_dynamic_map), the final
             parameter, and the final codes and block maxima of both moments.
  lion:      20 steps of Lion in float64 (lion-pytorch's update, written out below) from the
             Llama fixture (tests/fixtures/hf-llama-tiny) on the rows kiln trains on
             (`kiln dump-data`), weight decay on matrices only, as kiln decays: the losses
             tests/optimizers.rs holds kiln's f32 Lion to.

torch, transformers and bitsandbytes are not dependencies of kiln: install them into a scratch
virtualenv (python3 -m venv /tmp/venv-hf && /tmp/venv-hf/bin/pip install torch transformers
bitsandbytes safetensors numpy).
"""
import argparse, copy, json, os, sys
import torch

sys.path.insert(0, os.path.dirname(__file__))
from make_hf_fixture import DECODER_TRAIN, kiln_rows  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "optimizers.json")
N_8BIT, STEPS_8BIT = 1024, 10
LION_TRAIN = {**DECODER_TRAIN, "train.steps": 20, "train.optimizer": "lion", "train.lr": 1e-4,
              "train.beta1": 0.9, "train.beta2": 0.99, "train.weight_decay": 0.1}


def lcg(seed, n):
    """n values in [-1, 1) from a 32-bit LCG: (x >> 8) / 2^24 * 2 - 1, exact in f32."""
    x, out = seed, []
    for _ in range(n):
        x = (x * 1664525 + 1013904223) % (1 << 32)
        out.append((x >> 8) / float(1 << 24) * 2.0 - 1.0)
    return torch.tensor(out, dtype=torch.float32)


def block_scales(n):
    return torch.tensor([2.0 ** (-2 * (i // 256)) for i in range(n)], dtype=torch.float32)


def nearest_quantize(A, code, absmax_out, out_uint8, blocksize):
    """bitsandbytes' pure-PyTorch ("default" backend) blockwise quantizer: the nearest code to
    A / absmax (torch.bucketize over the midpoints). Its C CPU quantizer (a binary search) and
    its CUDA one (a quadrant search) round about 0.1% of values to a neighbouring code instead;
    kiln rounds to nearest, so the reference does too."""
    blocks = A.reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    bounds = (code[:-1] + code[1:]) / 2
    out_uint8.copy_(torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8).reshape(A.shape))
    absmax_out.copy_(absmax)


def adamw8bit():
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import bitsandbytes.backends.cpu.ops as cpu_ops
    cpu_ops._quant_blockwise_fp32_direct = nearest_quantize
    p = torch.nn.Parameter(lcg(1, N_8BIT))
    opt = bnb.optim.AdamW8bit([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                              min_8bit_size=0)
    for t in range(STEPS_8BIT):
        p.grad = lcg(100 + t, N_8BIT) * block_scales(N_8BIT)
        opt.step()
    st = opt.state[p]
    return {
        "about": f"bitsandbytes {bnb.__version__} AdamW8bit on the CPU with nearest-code quantization, torch {torch.__version__}",
        "n": N_8BIT, "steps": STEPS_8BIT, "lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8,
        "weight_decay": 0.01, "param_seed": 1, "grad_seed": 100,
        "signed_map": F.create_dynamic_map(signed=True).tolist(),
        "unsigned_map": F.create_dynamic_map(signed=False).tolist(),
        "param": p.detach().tolist(),
        "exp_avg_codes": st["state1"].tolist(), "exp_avg_absmax": st["absmax1"].tolist(),
        "exp_avg_sq_codes": st["state2"].tolist(), "exp_avg_sq_absmax": st["absmax2"].tolist(),
    }


def lion_f64(kiln):
    import transformers
    fixture = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf-llama-tiny")
    model = transformers.AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32)
    model = model.to(torch.float64).train()
    rows = kiln_rows(kiln, os.path.join(fixture, "tokens.bin"), LION_TRAIN["train.steps"],
                     train=LION_TRAIN)
    t = LION_TRAIN
    lr, b1, b2, wd = t["train.lr"], t["train.beta1"], t["train.beta2"], t["train.weight_decay"]
    params = [(p, p.dim() >= 2) for p in model.parameters()]
    state = [torch.zeros_like(p) for p, _ in params]
    losses = []
    for step_rows in rows:
        ids = torch.tensor(step_rows)
        logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for (p, decay), m in zip(params, state):
                if decay:
                    p.mul_(1 - lr * wd)
                update = (m * b1 + p.grad * (1 - b1)).sign()
                p.add_(update, alpha=-lr)
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        losses.append(loss.item())
    return {"about": f"Lion in float64, torch {torch.__version__}, transformers {transformers.__version__}",
            "train": LION_TRAIN, "losses": losses}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kiln", required=True, help="the kiln binary (for `kiln dump-data`)")
    args = ap.parse_args()
    out = {"adamw8bit": adamw8bit(), "lion": lion_f64(args.kiln)}
    with open(OUT, "w") as f:
        json.dump(out, f)
        f.write("\n")
    print("lion losses", out["lion"]["losses"][:3], "...", out["lion"]["losses"][-1])


if __name__ == "__main__":
    main()
