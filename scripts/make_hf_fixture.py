#!/usr/bin/env python3
"""Makes tests/fixtures/hf-gpt2-tiny/ with Hugging Face transformers, once; the output is
committed, so CI needs no torch (issue 12).

  make:   python scripts/make_hf_fixture.py --kiln target/release/kiln
          A small random GPT2LMHeadModel (tied embeddings, key bias, every bias and LayerNorm
          parameter non-zero) saved with save_pretrained; a uint16 token file; the rows kiln
          trains on at step 1 (asked from `kiln dump-data`, so the rows are kiln's own); and
          reference.json: transformers' loss on those rows (its own labels= loss in float32,
          and the mean next-token NLL from the logits in float32 and float64), and a greedy
          continuation of a prompt with the margin between the best and second-best logit
          at each step (a margin far above f32 rounding, so kiln's argmax must agree).
  check:  python scripts/make_hf_fixture.py --kiln target/release/kiln --check-export
          Exports the fixture through kiln (`kiln train --set model.init_from=... --set
          train.steps=... ` is not needed: `kiln export --format hf` of a 0-step checkpoint is
          the fixture itself), reloads it with GPT2LMHeadModel.from_pretrained, asserts no
          missing/unexpected/mismatched weights and no warnings, and compares its loss and
          tensors with the fixture's.
  decoders: python scripts/make_hf_fixture.py --kiln target/release/kiln --arch llama
          (or qwen2, phi3) makes tests/fixtures/hf-{llama,qwen2,phi3}-tiny/: a small random
          LlamaForCausalLM (untied, grouped-query attention, Llama 3 rotary scaling with bands
          inside the training length, attention biases), Qwen2ForCausalLM (tied, q/k/v
          biases, grouped-query attention) or Phi3ForCausalLM (tied, fused projections,
          partial rotary, LongRoPE) saved with save_pretrained; a uint16 token file;
          and reference.json: the rows kiln trains on for 10 steps (`kiln dump-data`),
          transformers' step-1 loss, and the losses of 10 steps of torch.optim.AdamW in
          float64 on those rows with kiln's settings (DECODER_TRAIN) — the trajectory
          tests/hf_llama.rs holds kiln to.
          --check-export with --arch: ten steps through kiln with a checkpoint, exported with
          `kiln export --format hf`, reloaded by transformers: its loss equals kiln's.

torch and transformers are not dependencies of kiln: install them into a scratch virtualenv
(python3 -m venv /tmp/venv-hf && /tmp/venv-hf/bin/pip install torch transformers safetensors).
"""
import argparse, json, logging, os, subprocess, sys, tempfile
import numpy as np
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel
from safetensors.numpy import load_file

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "hf-gpt2-tiny")
VOCAB, D, LAYERS, HEADS, POSITIONS = 384, 64, 2, 4, 64
SEQ, GLOBAL_BATCH, MICRO_BATCH, DATA_SEED = 32, 4, 2, 1234
PROMPT_TEXT = "a b c"  # r50k (GPT-2) ids 64, 275, 269: all below VOCAB
PROMPT_IDS = [64, 275, 269]
GREEDY_TOKENS = 12

# The kiln settings that cut the same rows (tests/hf_gpt2.rs uses the same).
def kiln_sets(fixture):
    return [
        f"model.init_from={fixture}", "model.qkv_bias=qkv", "model.tie_embeddings=true",
        f"model.seq_len={SEQ}", "data.source=tokens", f"data.path={fixture}/tokens.bin",
        f"data.seed={DATA_SEED}", "train.steps=1", f"train.global_batch={GLOBAL_BATCH}",
        f"train.micro_batch={MICRO_BATCH}",
    ]


def losses(model, rows):
    """transformers' own loss, and the mean next-token NLL from logits in f32 and f64."""
    ids = torch.tensor(rows, dtype=torch.long)
    with torch.no_grad():
        # Positions 0..T-1 predict tokens 1..T; token T is only a label (causal attention), so
        # this is kiln's loss on inputs row[:T], targets row[1:].
        own = model(input_ids=ids, labels=ids).loss.item()
        out = {"transformers_labels_f32": own}
        for name, dtype in [("nll_f32", torch.float32), ("nll_f64", torch.float64)]:
            m = model.to(dtype)
            logits = m(input_ids=ids[:, :-1]).logits.to(torch.float64)
            logp = torch.log_softmax(logits, dim=-1)
            out[name] = -logp.gather(-1, ids[:, 1:, None]).mean().item()
        model.to(torch.float32)
    return out


def greedy(model, prompt, n):
    ids, margins = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].to(torch.float64)
            top = torch.topk(logits, 2)
            margins.append((top.values[0] - top.values[1]).item())
            ids.append(int(top.indices[0]))
    return ids[len(prompt):], margins


def make(args):
    os.makedirs(FIXTURE, exist_ok=True)
    torch.manual_seed(12)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=D, n_layer=LAYERS,
                     n_head=HEADS, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("wte.weight"):
                # Peaked logits (tied head), so that greedy decoding has clear winners.
                p.normal_(0.0, 0.15)
            elif name.endswith(("attn.weight", "proj.weight", "fc.weight", "wpe.weight")):
                # Blocks strong enough that the continuation is not the tied embedding's
                # echo of the last token.
                p.normal_(0.0, 0.15)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif "ln" in name:
                p.normal_(1.0, 0.1)
            # No exact zeros (torch's sampler gave two): a step at learning rate 1e-30 then
            # leaves every value as it is, which the export test relies on.
            p[p == 0] = 1e-3
    model.save_pretrained(FIXTURE, safe_serialization=True)
    rng = np.random.default_rng(7)
    rng.integers(0, VOCAB, size=4096, dtype=np.uint16).tofile(os.path.join(FIXTURE, "tokens.bin"))
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = os.path.join(tmp, "rows.bin")
        cmd = [args.kiln, "dump-data", "--out", rows_path]
        for s in kiln_sets(FIXTURE):
            cmd += ["--set", s]
        subprocess.run(cmd, check=True)
        rows = np.fromfile(rows_path, dtype=np.uint16).reshape(GLOBAL_BATCH, SEQ + 1)
    rows = rows.astype(np.int64).tolist()
    ref = {
        "about": "made by scripts/make_hf_fixture.py with transformers " + transformers.__version__
                 + ", torch " + torch.__version__,
        "seq_len": SEQ, "global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH,
        "data_seed": DATA_SEED, "rows": rows, "loss": losses(model, rows),
        "prompt_text": PROMPT_TEXT, "prompt_ids": PROMPT_IDS,
    }
    ref["greedy_ids"], ref["greedy_margins"] = greedy(model, PROMPT_IDS, GREEDY_TOKENS)
    assert len(set(ref["greedy_ids"])) >= 3, f"a dull continuation: {ref['greedy_ids']}"
    assert min(ref["greedy_margins"]) > 1e-2, "an argmax too close to call in f32"
    with open(os.path.join(FIXTURE, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    print(json.dumps(ref["loss"]), "min greedy margin", min(ref["greedy_margins"]))


def check_export(args):
    ref = json.load(open(os.path.join(FIXTURE, "reference.json")))
    with tempfile.TemporaryDirectory() as tmp:
        ck, out = os.path.join(tmp, "ck"), os.path.join(tmp, "hf")
        # A checkpoint holding the fixture's weights: a run whose learning rate is zero.
        cmd = [args.kiln, "train", "--quiet", "--set", f"checkpoint.dir={ck}",
               "--set", f"output.dir={tmp}/run", "--set", "train.lr=1e-30",
               "--set", "train.weight_decay=0"]
        for s in kiln_sets(FIXTURE):
            cmd += ["--set", s]
        subprocess.run(cmd, check=True)
        subprocess.run([args.kiln, "export", "--format", "hf", ck, out], check=True)
        records = logging.getLogger("transformers")
        seen = []
        handler = logging.Handler()
        handler.emit = lambda r: seen.append(r.getMessage())
        records.addHandler(handler)
        transformers.logging.set_verbosity_warning()
        model, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
        model.eval()
        bad = {k: v for k, v in info.items() if v}
        assert not bad, f"loading info: {bad}"
        warnings = [m for m in seen if "weight" in m.lower()]
        assert not warnings, f"transformers warned: {warnings}"
        got = losses(model, ref["rows"])
        mine = load_file(os.path.join(out, "model.safetensors"))
        theirs = load_file(os.path.join(FIXTURE, "model.safetensors"))
        assert sorted(mine) == sorted(k for k in theirs if k in mine), "tensor names differ"
        worst = max(float(np.abs(mine[k] - theirs[k]).max()) for k in mine)
        loss_step1 = [json.loads(l)["loss"] for l in open(f"{tmp}/run/metrics.jsonl")][0]
    print(json.dumps({"export_reloaded_loss": got, "fixture_loss": ref["loss"],
                      "kiln_step1_loss": loss_step1, "max_abs_tensor_diff": worst,
                      "loading_info": {k: len(v) for k, v in info.items()}}, indent=1))
    rel = abs(got["transformers_labels_f32"] - loss_step1) / loss_step1
    print(f"relative difference, reloaded export vs kiln: {rel:.3e}")
    assert rel <= 1e-5


# The decoder fixtures' training settings, as kiln keys (tests/hf_llama.rs uses the same).
DECODER_TRAIN = {
    "model.seq_len": SEQ, "data.source": "tokens", "data.seed": DATA_SEED,
    "train.steps": 10, "train.global_batch": GLOBAL_BATCH, "train.micro_batch": MICRO_BATCH,
    "train.lr": 1e-3, "train.schedule": "constant", "train.warmup_steps": 0,
    "train.weight_decay": 0.01, "train.beta1": 0.9, "train.beta2": 0.999, "train.eps": 1e-8,
    "train.clip_grad": 0.0,
}


DECODER_PROMPT = [5, 17, 42, 300, 7]


def decoder_model(arch):
    common = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=96, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=POSITIONS,
                  rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        # Bands of the llama3 scaling inside the 32-token rows: wavelengths above 16 are
        # divided by 4, below 4 kept, blended between.
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        cfg = LlamaConfig(**common, tie_word_embeddings=False, attention_bias=True,
                          rope_parameters=rope)
        return LlamaForCausalLM(cfg)
    if arch == "phi3":
        from transformers import Phi3Config, Phi3ForCausalLM
        # LongRoPE's short factors (rows of 32 < the original 64 positions) and its attention
        # factor sqrt(1 + ln 2 / ln 64); a quarter of each head passes through unrotated.
        pairs = 6
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "short_factor": [1.0 + 0.3 * i for i in range(pairs)],
                "long_factor": [2.0 + 0.5 * i for i in range(pairs)],
                "original_max_position_embeddings": 64}
        cfg = Phi3Config(**{**common, "max_position_embeddings": 2 * POSITIONS},
                         original_max_position_embeddings=64, tie_word_embeddings=True,
                         rope_parameters=rope)
        return Phi3ForCausalLM(cfg)
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(**common, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    return Qwen2ForCausalLM(cfg)


def kiln_rows(kiln, tokens, steps, masked=False, train=None):
    """kiln's rows for `steps` steps of `train` (DECODER_TRAIN by default) on `tokens`
    (step-major): the data depend on the data settings only, so a GPT of the same vocab and
    seq_len cuts them. With `masked`, also the rows' label masks."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_path = os.path.join(tmp, "rows.bin")
        cmd = [kiln, "dump-data", "--out", rows_path, "--set", f"model.vocab={VOCAB}",
               "--set", f"model.max_seq_len={POSITIONS}", "--set", f"data.path={tokens}"]
        for k, v in (train or DECODER_TRAIN).items():
            if k.startswith(("data.", "model.seq_len", "train.steps", "train.global_batch", "train.micro_batch")):
                cmd += ["--set", f"{k}={json.dumps(v)}"]
        subprocess.run(cmd, check=True)
        rows = np.fromfile(rows_path, dtype=np.uint16).reshape(steps, GLOBAL_BATCH, SEQ + 1)
        if masked:
            mask = np.fromfile(os.path.join(tmp, "rows.mask"), dtype=np.uint8)
            return rows.astype(np.int64), mask.reshape(steps, GLOBAL_BATCH, SEQ + 1)
    return rows.astype(np.int64)


def labels(ids, mask):
    """Next-token targets, -100 (ignored) where the label mask says the token is no target."""
    targets = ids[:, 1:].clone()
    if mask is not None:
        targets[torch.tensor(mask)[:, 1:] == 0] = -100
    return targets


def adamw_f64(model, rows, masks=None):
    """Losses of len(rows) steps of torch.optim.AdamW in float64 with DECODER_TRAIN's settings:
    decay on matrices (embeddings too), not on biases and norm gains, as kiln does; with
    `masks`, the loss is the mean over the targets they keep (transformers' -100 labels)."""
    model = model.to(torch.float64).train()
    t = DECODER_TRAIN
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["train.weight_decay"]},
                             {"params": other, "weight_decay": 0.0}], lr=t["train.lr"],
                            betas=(t["train.beta1"], t["train.beta2"]), eps=t["train.eps"])
    out = []
    for t, step_rows in enumerate(rows):
        ids = torch.tensor(step_rows)
        logits = model(input_ids=ids[:, :-1]).logits
        targets = labels(ids, None if masks is None else masks[t])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def masked_reference(args, fixture, model):
    """Instruction-style data in `fixture`/masked: tokens with a random label mask (40% of the
    tokens are targets) and the meta.json `prepare-data --format jsonl` writes; transformers'
    step-1 loss with -100 labels off the mask, and ten steps of float64 AdamW on them."""
    out = os.path.join(fixture, "masked")
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(9)
    rng.integers(0, VOCAB, size=4096, dtype=np.uint16).tofile(os.path.join(out, "train.bin"))
    (rng.random(4096) < 0.4).astype(np.uint8).tofile(os.path.join(out, "train.mask.bin"))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump({"format": "jsonl", "dtype": "uint16 little-endian",
                   "mask": "train.mask.bin: one byte per token, 1 = a training target"}, f, indent=1)
    rows, masks = kiln_rows(args.kiln, os.path.join(out, "train.bin"), DECODER_TRAIN["train.steps"], masked=True)
    with torch.no_grad():
        ids = torch.tensor(rows[0])
        first = model(input_ids=ids[:, :-1], labels=None).logits
        targets = labels(ids, masks[0])
        own = model(input_ids=ids, labels=torch.cat([ids[:, :1], targets], 1)).loss.item()
        nll = torch.nn.functional.cross_entropy(first.double().reshape(-1, VOCAB), targets.reshape(-1)).item()
    import copy
    return {"trained_targets_step1": int((masks[0][:, 1:] == 1).sum()),
            "loss": {"transformers_labels_f32": own, "nll_f64": nll},
            "adamw_f64_losses": adamw_f64(copy.deepcopy(model), rows, masks)}


def make_decoder(args):
    fixture = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", f"hf-{args.arch}-tiny")
    os.makedirs(fixture, exist_ok=True)
    torch.manual_seed(13)
    model = decoder_model(args.arch).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            else:
                # Weights far from transformers' N(0, 0.02), so that the loss is not ln(vocab)
                # and every path (rotation, GQA sharing, biases) moves it.
                p.normal_(0.0, 0.15)
    model.save_pretrained(fixture, safe_serialization=True)
    tokens = os.path.join(fixture, "tokens.bin")
    np.random.default_rng(8).integers(0, VOCAB, size=4096, dtype=np.uint16).tofile(tokens)
    rows = kiln_rows(args.kiln, tokens, DECODER_TRAIN["train.steps"])
    first = rows[0].tolist()
    ref = {
        "about": "made by scripts/make_hf_fixture.py --arch " + args.arch + " with transformers "
                 + transformers.__version__ + ", torch " + torch.__version__,
        "train": DECODER_TRAIN, "rows": first, "loss": losses(model, first),
        "prompt_ids": DECODER_PROMPT,
    }
    # generate(do_sample=False) with transformers' own cache, and the margin between the best
    # and second-best logit at each step (recomputed without a cache) far above f32 rounding.
    with torch.no_grad():
        out = model.generate(torch.tensor([DECODER_PROMPT]), do_sample=False,
                             max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS)
    ref["greedy_ids"] = out[0, len(DECODER_PROMPT):].tolist()
    ids, ref["greedy_margins"] = greedy(model, DECODER_PROMPT, GREEDY_TOKENS)
    assert ids == ref["greedy_ids"], (ids, ref["greedy_ids"])
    assert min(ref["greedy_margins"]) > 1e-3, "an argmax too close to call in f32"
    if args.arch == "llama":
        ref["masked"] = masked_reference(args, fixture, model)
    ref["adamw_f64_losses"] = adamw_f64(model, rows)
    with open(os.path.join(fixture, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    print(json.dumps(ref["loss"]), ref["adamw_f64_losses"])


def check_decoder_export(args):
    """Ten steps from the fixture with a checkpoint, `kiln export --format hf`, reloaded by
    transformers: its loss on the validation rows equals kiln's validation loss after the
    tenth step (1e-5), and from_pretrained reports nothing missing or unexpected."""
    fixture = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", f"hf-{args.arch}-tiny")
    tokens = os.path.join(fixture, "tokens.bin")
    with tempfile.TemporaryDirectory() as tmp:
        ck, out, run = (os.path.join(tmp, n) for n in ("ck", "hf", "run"))
        cmd = [args.kiln, "train", "--quiet", "--set", f"model.init_from={fixture}",
               "--set", f"data.path={tokens}", "--set", f"data.val_path={tokens}",
               "--set", "train.eval_every=10", "--set", "train.eval_batches=1",
               "--set", f"checkpoint.dir={ck}", "--set", f"output.dir={run}"]
        for k, v in DECODER_TRAIN.items():
            cmd += ["--set", f"{k}={json.dumps(v)}"]
        subprocess.run(cmd, check=True)
        subprocess.run([args.kiln, "export", "--format", "hf", ck, out], check=True)
        model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        bad = {k: v for k, v in info.items() if v}
        assert not bad, f"loading info: {bad}"
        summary = json.load(open(os.path.join(run, "summary.json")))
        kiln_val = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))
                    if "val_loss" in json.loads(l)][-1]["val_loss"]
    ids = np.fromfile(tokens, dtype=np.uint16).astype(np.int64)
    rows = [ids[i * SEQ: i * SEQ + SEQ + 1].tolist() for i in range(GLOBAL_BATCH)]
    got = losses(model.eval(), rows)
    r = abs(got["nll_f64"] - kiln_val) / kiln_val
    print(json.dumps({"kiln_val_loss_after_10_steps": kiln_val, "reloaded_export": got,
                      "relative_difference": r, "kiln_final_loss": summary.get("final_loss")}, indent=1))
    assert r <= 1e-5


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--check-export", action="store_true")
    ap.add_argument("--arch", choices=["gpt2", "llama", "qwen2", "phi3"], default="gpt2")
    a = ap.parse_args()
    if a.arch != "gpt2":
        check_decoder_export(a) if a.check_export else make_decoder(a)
    else:
        check_export(a) if a.check_export else make(a)
