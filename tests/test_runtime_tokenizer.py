"""Per-item tokenising: one short text through `encode`, anything else through encode_batch,
with the same result either way."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from appliance.runtime.tokenizer import INLINE_CHARS, TextTokenizer
from tests.conftest import build_wordpiece_tokenizer


def test_one_text_and_a_batch_give_the_same_encodings(tmp_path: Path) -> None:
    build_wordpiece_tokenizer(tmp_path)
    tok = TextTokenizer(tmp_path / "tokenizer.json", max_tokens=16, pad_token_id=0)
    texts = ["hello world", "", "a much longer sentence " * 5, "x" * (INLINE_CHARS + 10)]
    together = tok.encode(texts)
    assert [tok.encode([t])[0] for t in texts] == together
    assert together[2].truncated and together[2].n_tokens == 16
    pairs = ["a question", "another one", "", "q"]
    assert [tok.encode([t], [p])[0] for t, p in zip(texts, pairs, strict=True)] == tok.encode(
        texts, pairs
    )


def test_a_long_text_lets_other_threads_run_while_it_is_tokenised(tmp_path: Path) -> None:
    build_wordpiece_tokenizer(tmp_path)
    tok = TextTokenizer(tmp_path / "tokenizer.json", max_tokens=64, pad_token_id=0)
    text = "hello world, a text of many words " * 10_000  # ~340 KB, within a request body
    ticks: list[float] = []
    done = threading.Event()

    def ticker() -> None:
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    thread = threading.Thread(target=ticker)
    thread.start()
    start = time.perf_counter()
    tok.encode([text])
    took = time.perf_counter() - start
    done.set()
    thread.join()
    during = [t for t in ticks if start <= t <= start + took]
    gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
    # Holding the GIL for the whole text would leave one gap as long as the call itself.
    assert took > 0.05 and len(during) > 5 and max(gaps) < took / 2
