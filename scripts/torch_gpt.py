#!/usr/bin/env python3
"""The same GPT as kiln's (pre-LN blocks, fused qkv with query/value biases only, tanh GELU,
untied head, linear weights stored [d_in, d_out]) in PyTorch, as a reference on this machine.

  bench:  python scripts/torch_gpt.py bench --threads 1 --micro-batch 8 --steps 20
          prints the median ms per optimizer step (forward, backward, AdamW) of the tiny preset.
  train:  kiln dump-data --config configs/tiny.toml --out /tmp/rows.bin
          python scripts/torch_gpt.py train --data /tmp/rows.bin --steps 600 --global-batch 16
          trains on exactly the rows kiln trains on and prints the loss per step.

PyTorch is not a dependency of kiln; install it into a scratch virtualenv.
"""
import argparse, math, statistics, time
import numpy as np
import torch
import torch.nn.functional as F

PRESETS = {"tiny": (256, 256, 4, 4, 128), "small": (256, 512, 8, 8, 256)}


class Block(torch.nn.Module):
    def __init__(self, d, h, n_layers):
        super().__init__()
        std, resid = 0.02, 0.02 / math.sqrt(2 * n_layers)
        self.h = h
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv_w = torch.nn.Parameter(torch.randn(d, 3 * d) * std)
        self.qv_b = torch.nn.Parameter(torch.zeros(2 * d))
        self.proj_w = torch.nn.Parameter(torch.randn(d, d) * resid)
        self.proj_b = torch.nn.Parameter(torch.zeros(d))
        self.fc_w = torch.nn.Parameter(torch.randn(d, 4 * d) * std)
        self.fc_b = torch.nn.Parameter(torch.zeros(4 * d))
        self.fc2_w = torch.nn.Parameter(torch.randn(4 * d, d) * resid)
        self.fc2_b = torch.nn.Parameter(torch.zeros(d))

    def forward(self, x):
        b, t, d = x.shape
        zeros = torch.zeros(d, dtype=x.dtype)
        bias = torch.cat([self.qv_b[:d], zeros, self.qv_b[d:]])
        qkv = self.ln1(x) @ self.qkv_w + bias
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in qkv.split(d, dim=2))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + a @ self.proj_w + self.proj_b
        m = F.gelu(self.ln2(x) @ self.fc_w + self.fc_b, approximate="tanh")
        return x + m @ self.fc2_w + self.fc2_b


class Gpt(torch.nn.Module):
    def __init__(self, vocab, d, n_layers, h, seq):
        super().__init__()
        self.wte = torch.nn.Parameter(torch.randn(vocab, d) * 0.02)
        self.wpe = torch.nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(d, h, n_layers) for _ in range(n_layers))
        self.ln_f = torch.nn.LayerNorm(d)
        self.head = torch.nn.Parameter(torch.randn(d, vocab) * 0.02)

    def forward(self, idx, targets):
        x = self.wte[idx] + self.wpe[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln_f(x) @ self.head
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def optimizer(model, lr):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def lr_at(t, lr, warmup, steps, min_ratio=0.1):
    if t < warmup:
        return lr * (t + 1) / warmup
    progress = min(1.0, (t - warmup) / max(1, steps - warmup))
    lo = lr * min_ratio
    return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * progress))


def bench(args):
    torch.set_num_threads(args.threads)
    vocab, d, n_layers, h, seq = PRESETS[args.preset]
    torch.manual_seed(0)
    model = Gpt(vocab, d, n_layers, h, seq)
    opt = optimizer(model, 1e-3)
    idx = torch.randint(0, vocab, (args.micro_batch, seq + 1))
    times = []
    for step in range(args.steps + 3):
        start = time.perf_counter()
        loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= 3:
            times.append((time.perf_counter() - start) * 1e3)
    ms = statistics.median(times)
    print(f"torch {torch.__version__} threads {args.threads} preset {args.preset} micro-batch {args.micro_batch}: "
          f"median {ms:.1f} ms/step, {args.micro_batch * seq / ms * 1e3:.0f} tokens/s")


def train(args):
    torch.set_num_threads(args.threads)
    vocab, d, n_layers, h, seq = PRESETS[args.preset]
    seq = args.seq_len or seq
    torch.manual_seed(0)
    model = Gpt(vocab, d, n_layers, h, PRESETS[args.preset][4])
    opt = optimizer(model, args.lr)
    rows = np.fromfile(args.data, dtype="<u2").astype(np.int64).reshape(-1, args.global_batch, seq + 1)
    losses = []
    for t in range(min(args.steps, rows.shape[0])):
        for g in opt.param_groups:
            g["lr"] = lr_at(t, args.lr, args.warmup, args.steps)
        batch = torch.from_numpy(rows[t])
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (t + 1) % args.every == 0:
            print(f"step {t + 1} loss {loss.item():.4f} (mean of last 20: {statistics.mean(losses[-20:]):.4f})", flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--preset", default="tiny")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--micro-batch", type=int, default=8)
    b.add_argument("--steps", type=int, default=20)
    t = sub.add_parser("train")
    t.add_argument("--data", required=True)
    t.add_argument("--preset", default="tiny")
    t.add_argument("--seq-len", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--steps", type=int, default=600)
    t.add_argument("--global-batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup", type=int, default=50)
    t.add_argument("--every", type=int, default=25)
    args = p.parse_args()
    bench(args) if args.cmd == "bench" else train(args)


if __name__ == "__main__":
    main()
