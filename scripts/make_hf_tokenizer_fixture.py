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
# Llama 3 Instruct's and Qwen2's chat templates, as their tokenizer_config.json files ship them.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# The instruction records (tests/fixtures/hf-tokenizers/chat.jsonl): both record shapes, a
# system message, two assistant turns, text the template trims, non-ASCII.
RECORDS = [
    {"prompt": "What is 2 + 2?", "response": "4."},
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "  Name a play by Shakespeare. "},
                  {"role": "assistant", "content": "Hamlet."},
                  {"role": "user", "content": "Où se passe-t-elle ?"},
                  {"role": "assistant", "content": "À Elseneur, au Danemark 🏰."}]},
    {"messages": [{"role": "user", "content": "Say hi in Japanese."},
                  {"role": "assistant", "content": "こんにちは"}]},
]
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
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    return tok, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                 "chat_template": LLAMA3_TEMPLATE}


def sentencepiece():
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    # A small alphabet: characters outside it (CJK, emoji, accents) go through byte fallback.
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()▁\n")
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials + byte_tokens,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tok, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                 "chat_template": CHATML_TEMPLATE}


def messages_of(record):
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]}]


def chat_reference(hf):
    """transformers' rendering and ids of each record, and the label mask: a token is a target
    when it starts inside an assistant turn (from the end of the conversation before it,
    rendered with add_generation_prompt=True, to the end of the conversation through it)."""
    out = {"texts": [], "ids": [], "mask": []}
    for record in RECORDS:
        msgs = messages_of(record)
        text = hf.apply_chat_template(msgs, tokenize=False)
        enc = hf(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = hf.apply_chat_template(msgs, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert list(ids) == enc["input_ids"], "apply_chat_template's ids are the text's"
        spans = []
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                before = hf.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
                through = hf.apply_chat_template(msgs[:i + 1], tokenize=False)
                assert text.startswith(through) and through.startswith(before)
                spans.append((len(before.encode()), len(through.encode())))
        starts = [len(text[:a].encode()) for a, _ in enc["offset_mapping"]]
        out["texts"].append(text)
        out["ids"].extend(enc["input_ids"])
        out["mask"].extend(int(any(a <= s < b for a, b in spans)) for s in starts)
    return out


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
        "chat": chat_reference(hf),
    }
    (out / "reference.json").write_text(json.dumps(ref, ensure_ascii=False) + "\n")
    print(name, "vocab", len(hf), "multiscript", len(ids), "ids")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "chat.jsonl", "w", encoding="utf-8") as f:
        for r in RECORDS:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    write("bytelevel", bytelevel())
    write("sentencepiece", sentencepiece())
