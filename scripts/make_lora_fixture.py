#!/usr/bin/env python3
"""LoRA held to Hugging Face PEFT (issue 29). The output is committed, so CI needs no torch.

  make:   python scripts/make_lora_fixture.py --kiln target/release/kiln
          For the Llama and Phi-3 fixtures (tests/fixtures/hf-{llama,phi3}-tiny, made by
          make_hf_fixture.py): a PEFT LoRA adapter (r 4, alpha 8; Llama: q_proj, v_proj,
          down_proj; Phi-3: the fused qkv_proj and gate_up_proj) made by peft.get_peft_model with
          init_lora_weights=False — B is random rather than zero, so the adapter changes the
          model from the first step — saved with save_pretrained into the fixture's lora/, and
          reference.json's `lora`: peft's get_nb_trainable_parameters(), PEFT's step-1 loss on
          kiln's rows (float32), and the losses of ten steps of torch.optim.AdamW in float64
          over the adapter alone (the base frozen) with LORA_TRAIN — what tests/lora.rs holds
          kiln to, starting from that adapter with `lora.init_from`.
  check:  python scripts/make_lora_fixture.py --kiln target/release/kiln --check-export
          Ten steps through kiln from the adapter, with a checkpoint; `kiln export --format
          peft` reloaded by PeftModel.from_pretrained onto transformers' base, and `kiln export
          --format hf --merge` reloaded by from_pretrained: each one's loss on the validation rows
          equals kiln's validation loss after the tenth step (1e-5).

torch, transformers and peft are not dependencies of kiln: install them into a scratch
virtualenv (python3 -m venv /tmp/venv-hf && /tmp/venv-hf/bin/pip install torch transformers peft safetensors).
"""
import argparse, copy, json, os, subprocess, sys, tempfile
import numpy as np
import torch
import peft
import transformers

sys.path.insert(0, os.path.dirname(__file__))
from make_hf_fixture import DECODER_TRAIN, GLOBAL_BATCH, SEQ, kiln_rows, losses  # noqa: E402

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "phi3": ["qkv_proj", "gate_up_proj"]}
R, ALPHA = 4, 8
LORA_TRAIN = {**DECODER_TRAIN, "train.lr": 1e-2}


def fixture(arch):
    return os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", f"hf-{arch}-tiny")


def base(arch):
    return transformers.AutoModelForCausalLM.from_pretrained(fixture(arch), dtype=torch.float32).eval()


def loss_of(model, rows):
    ids = torch.tensor(rows)
    logits = model(input_ids=ids[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def adamw_f64(model, rows):
    """Ten steps of float64 AdamW on the adapter's factors (decayed: they are matrices)."""
    model = model.to(torch.float64).train()
    t = LORA_TRAIN
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t["train.lr"], betas=(t["train.beta1"], t["train.beta2"]),
                            eps=t["train.eps"], weight_decay=t["train.weight_decay"])
    out = []
    for step_rows in rows:
        loss = loss_of(model, step_rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


def make(args, arch):
    torch.manual_seed(21)
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS[arch], lora_dropout=0.0,
                          init_lora_weights=False, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base(arch), cfg)
    model.save_pretrained(os.path.join(fixture(arch), "lora"))
    trainable, total = model.get_nb_trainable_parameters()
    rows = kiln_rows(args.kiln, os.path.join(fixture(arch), "tokens.bin"), LORA_TRAIN["train.steps"])
    with torch.no_grad():
        first = loss_of(model, rows[0]).item()
    ref_path = os.path.join(fixture(arch), "reference.json")
    ref = json.load(open(ref_path))
    ref["lora"] = {
        "about": f"made by scripts/make_lora_fixture.py with peft {peft.__version__}, transformers "
                 f"{transformers.__version__}, torch {torch.__version__}",
        "adapter": "lora", "train": LORA_TRAIN, "targets": TARGETS[arch],
        "trainable_params": trainable, "all_params": total,
        "peft_loss_step1_f32": first,
        "adamw_f64_losses": adamw_f64(copy.deepcopy(model), rows),
    }
    with open(ref_path, "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    print(arch, json.dumps({k: v for k, v in ref["lora"].items() if k != "train"}))


def check_export(args, arch):
    tokens = os.path.join(fixture(arch), "tokens.bin")
    with tempfile.TemporaryDirectory() as tmp:
        ck, adapter, merged, run = (os.path.join(tmp, n) for n in ("ck", "peft", "merged", "run"))
        cmd = [args.kiln, "train", "--quiet", "--set", f"model.init_from={fixture(arch)}",
               "--set", f"lora.init_from={fixture(arch)}/lora",
               "--set", f"data.path={tokens}", "--set", f"data.val_path={tokens}",
               "--set", "train.eval_every=10", "--set", "train.eval_batches=1",
               "--set", f"checkpoint.dir={ck}", "--set", f"output.dir={run}"]
        for k, v in LORA_TRAIN.items():
            cmd += ["--set", f"{k}={json.dumps(v)}"]
        subprocess.run(cmd, check=True)
        subprocess.run([args.kiln, "export", "--format", "peft", ck, adapter], check=True)
        subprocess.run([args.kiln, "export", "--format", "hf", "--merge", ck, merged], check=True)
        kiln_val = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))
                    if "val_loss" in json.loads(l)][-1]["val_loss"]
        ids = np.fromfile(tokens, dtype=np.uint16).astype(np.int64)
        rows = [ids[i * SEQ: i * SEQ + SEQ + 1].tolist() for i in range(GLOBAL_BATCH)]
        reloaded = peft.PeftModel.from_pretrained(base(arch), adapter).eval()
        merged_model, info = transformers.AutoModelForCausalLM.from_pretrained(merged, output_loading_info=True)
        assert not {k: v for k, v in info.items() if v}, info
        got = {"peft_reload": losses(reloaded, rows)["nll_f64"],
               "hf_merge_reload": losses(merged_model.eval(), rows)["nll_f64"]}
    report = {"arch": arch, "kiln_val_loss_after_10_steps": kiln_val, **got,
              "relative_difference": {k: abs(v - kiln_val) / kiln_val for k, v in got.items()}}
    print(json.dumps(report, indent=1))
    assert max(report["relative_difference"].values()) <= 1e-5


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default="target/release/kiln")
    ap.add_argument("--check-export", action="store_true")
    ap.add_argument("--arch", choices=sorted(TARGETS), action="append")
    a = ap.parse_args()
    for arch in a.arch or sorted(TARGETS):
        check_export(a, arch) if a.check_export else make(a, arch)
