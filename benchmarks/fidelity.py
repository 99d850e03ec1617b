"""fp32 reference vectors of the fixed sentence set, from the checkpoint in PyTorch
(transformers, mean pooling + L2: what sentence-transformers computes for all-MiniLM-L6-v2).
Each served system's vectors for the same sentences are compared with these (cosine).

Run in its own process by the harness: python -m benchmarks.fidelity CHECKPOINT"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def reference_vectors(checkpoint: str, texts: list[str], max_tokens: int) -> list[list[float]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModel.from_pretrained(checkpoint).eval()
    enc = tokenizer(
        texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
    )
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled.tolist()


def cosines(a: list[list[float]], b: list[list[float]]) -> dict[str, float]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    cos = (x * y).sum(axis=1)
    return {"mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 5)}


def main() -> None:
    from benchmarks.texts import FIDELITY_SENTENCES

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    vectors = reference_vectors(args.checkpoint, FIDELITY_SENTENCES, args.max_tokens)
    print("BENCH_JSON " + json.dumps({"vectors": vectors}), flush=True)


if __name__ == "__main__":
    main()
