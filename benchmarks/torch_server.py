"""The PyTorch fp32 baseline: the same checkpoint in transformers (mean pooling + L2, as
sentence-transformers does for all-MiniLM-L6-v2) behind the same HTTP stack as the appliance
(litestar + uvicorn, msgspec bodies) and the same endpoint shape, so the same load applies:

    POST /v1/text-vectorisation {"text": "..." | ["...", ...], "model": "..."} -> {"vector": ...}

A plain server, as most teams would write one: one model call at a time on a worker thread
(torch uses every core inside a call), a list request is one batched forward, and concurrent
requests are not merged. Run: python -m benchmarks.torch_server --model DIR --port N"""

from __future__ import annotations

import argparse
import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec


class Body(msgspec.Struct):
    text: str | list[str]
    model: str = "english"


def build_app(model_dir: str, max_tokens: int, threads: int) -> Any:
    import torch
    from litestar import Litestar, get, post
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")

    def embed(texts: list[str]) -> list[list[float]]:
        enc = tokenizer(
            texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
        )
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.tolist()

    embed(["warm up the model"])

    @post("/v1/text-vectorisation", status_code=200)
    async def vectorise(data: Body) -> dict[str, Any]:
        texts = data.text if isinstance(data.text, list) else [data.text]
        vectors = await asyncio.get_running_loop().run_in_executor(executor, embed, texts)
        return {"vector": vectors if isinstance(data.text, list) else vectors[0]}

    @get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return Litestar(route_handlers=[vectorise, readyz], request_max_body_size=8 * 1024 * 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="a local Hugging Face checkpoint folder")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import uvicorn

    app = build_app(args.model, args.max_tokens, args.threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
