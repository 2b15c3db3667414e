#!/usr/bin/env python3
"""bf16 and fp16 held to transformers (issue 29). The output is committed, so CI needs no torch.

  python scripts/make_precision_fixture.py
      For the Llama, Qwen2 and Phi-3 fixtures (tests/fixtures/hf-*-tiny, made by
      make_hf_fixture.py): transformers' step-1 loss with the model in bfloat16 and in float16
      (`model.to(dtype)`: weights rounded, every op in that dtype but what transformers keeps in
      f32 — RMSNorm's statistics, the attention softmax, the loss, which upcasts the logits) on
      kiln's step-1 rows (reference.json's `rows`), into reference.json's `bf16` and `fp16`;
      tests/precision.rs holds kiln's `train.precision` to them.

torch and transformers are not dependencies of kiln: install them into a scratch virtualenv
(python3 -m venv /tmp/venv-hf && /tmp/venv-hf/bin/pip install torch transformers safetensors).
"""
import json, os
import torch
import transformers


def fixture(arch):
    return os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", f"hf-{arch}-tiny")


def main():
    for arch in ["llama", "qwen2", "phi3"]:
        path = os.path.join(fixture(arch), "reference.json")
        ref = json.load(open(path))
        for key, dtype in [("bf16", torch.bfloat16), ("fp16", torch.float16)]:
            model = transformers.AutoModelForCausalLM.from_pretrained(fixture(arch), dtype=torch.float32).eval()
            model = model.to(dtype)
            ids = torch.tensor(ref["rows"])
            with torch.no_grad():
                logits = model(input_ids=ids[:, :-1]).logits.float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            f32 = ref["loss"]["transformers_labels_f32"]
            ref[key] = {
                "about": f"made by scripts/make_precision_fixture.py with transformers {transformers.__version__}, torch {torch.__version__}",
                "transformers_loss_step1": loss.item(),
                "relative_to_f32": abs(loss.item() - f32) / f32,
            }
        with open(path, "w") as f:
            json.dump(ref, f, indent=1)
            f.write("\n")
        print(arch, json.dumps(ref["bf16"]), json.dumps(ref["fp16"]))


if __name__ == "__main__":
    main()
