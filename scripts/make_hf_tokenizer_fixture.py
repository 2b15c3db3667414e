#!/usr/bin/env python3
"""Hugging Face tokenizer.json fixtures for kiln's tokenizer tests (issue 27).

Trains two small tokenizers with Hugging Face's `tokenizers` package on the fixture texts
(tests/fixtures/shakespeare and tests/fixtures/tokenizer/multiscript.txt), in the two styles
the models people fine-tune use, and writes each as a directory transformers loads:

  tests/fixtures/hf-tokenizers/bytelevel/      byte-level BPE with Llama 3's pre-tokenizer
                                               regex and a <|begin_of_text|> post-processor
                                               (Llama 3, Qwen2 and Phi-4 style)
  tests/fixtures/hf-tokenizers/sentencepiece/  SentencePiece-style BPE with byte fallback
                                               (▁ for spaces, <0xNN> tokens, <s> prepended:
                                               Llama 2 and TinyLlama style)

each with tokenizer.json, tokenizer_config.json (bos/eos tokens) and reference.json: the ids
transformers' AutoTokenizer gives for multiscript.txt (special tokens included, as
`tokenizer(text)` adds them) and for a few short strings, and the decoded text.
The output is committed: neither this script nor its dependencies are needed to build or test
kiln.

    python3 -m venv /tmp/venv-hf && /tmp/venv-hf/bin/pip install transformers tokenizers
    /tmp/venv-hf/bin/python scripts/make_hf_tokenizer_fixture.py
"""

import json
import pathlib

import tokenizers
import transformers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = FIXTURES / "hf-tokenizers"
# Llama 3's pre-tokenizer pattern (contractions, letters, 1–3 digit groups, punctuation runs,
# newlines, spaces).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SHORT = ["Hello, world!", "  two  spaces\tand a tab", "naïve café 東京 🙂", "x" * 40, "\n\nend\n"]


def read(path):
    """The file's text as kiln reads it: line endings kept (the multi-script text has a CRLF)."""
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def corpus():
    texts = sorted((FIXTURES / "shakespeare").glob("*.txt"))
    return [read(p) for p in texts] + [read(FIXTURES / "tokenizer" / "multiscript.txt")]


def bytelevel():
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    return tok, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}


def sentencepiece():
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"]
    # A small alphabet: characters outside it (CJK, emoji, accents) go through byte fallback.
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()▁\n")
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials + byte_tokens,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tok, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def write(name, made):
    tok, specials = made
    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    data = json.loads(tok.to_str())
    # Byte-fallback tokens are ordinary vocabulary in Llama 2's file (trained in as special
    # tokens above to reserve their ids): not added tokens, so decoding keeps them.
    data["added_tokens"] = [t for t in data["added_tokens"] if not t["content"].startswith("<0x")]
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 2048,
              "add_bos_token": True, **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    hf = AutoTokenizer.from_pretrained(str(out))
    text = read(FIXTURES / "tokenizer" / "multiscript.txt")
    ids = hf(text)["input_ids"]
    ref = {
        "about": f"made by scripts/make_hf_tokenizer_fixture.py with transformers "
                 f"{transformers.__version__}, tokenizers {tokenizers.__version__}",
        "vocab_size": len(hf), "multiscript_ids": ids,
        "multiscript_decoded": hf.decode(ids, skip_special_tokens=True),
        "short": [{"text": s, "ids": hf(s)["input_ids"]} for s in SHORT],
        "bos_id": hf.bos_token_id, "eos_id": hf.eos_token_id,
    }
    (out / "reference.json").write_text(json.dumps(ref, ensure_ascii=False) + "\n")
    print(name, "vocab", len(hf), "multiscript", len(ids), "ids")


if __name__ == "__main__":
    write("bytelevel", bytelevel())
    write("sentencepiece", sentencepiece())
