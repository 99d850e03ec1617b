"""Load texts: random words drawn from the model's own vocabulary, so every body is different
(no cache hits, no repeated inputs) while the token count per text stays close to a target.

The same word list and word-count range drive the wrk Lua script and the Python load
generator; `Shape.tokens_per_text` is measured with the model's tokenizer on a sample."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

WORD = re.compile(r"^[a-z]{3,12}$")

# A fixed sentence set for fidelity (INT8 vs fp32) and output checks: varied topics and lengths.
FIDELITY_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "iPhone 12 128GB",
    "A man is playing a guitar on the stage.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "The patient was admitted with chest pain and shortness of breath.",
    "Can you recommend a good restaurant near the station?",
    "Machine learning models can be compressed with 8-bit quantisation.",
    "It rained all day, so the football match was postponed until Sunday.",
    "Error 404: the requested page could not be found on this server!",
    "How do I reset my password if I no longer have access to my email?",
    "The committee will publish its final report on renewable energy subsidies next spring.",
    "Two dogs are running through a field of tall grass.",
    "Quarterly revenue grew 12% year over year, driven by subscription sales.",
    "Please cancel my order and refund the amount to my credit card.",
    "The museum's new exhibition explores the history of early photography in Europe.",
    "hello",
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells.",
    " ".join(
        [
            "Long support tickets describe several problems at once: the app crashes on start,",
            "the invoice shows the wrong amount, and nobody answered the previous three emails.",
        ]
        * 3
    ),
]


@dataclass(frozen=True)
class Shape:
    """One kind of request: text length (words per text) and texts per request."""

    name: str  # "short-single", "short-batch", "medium-single", "medium-batch"
    length: str  # "short" or "medium"
    min_words: int
    max_words: int
    per_request: int
    tokens_per_text: float = 0.0
    fixed: str = ""
    """Set: every request sends this one text (after the first, cache hits)."""

    @property
    def batch(self) -> bool:
        return self.per_request > 1


def vocabulary_words(tokenizer_path: Path, limit: int = 3000, seed: int = 0) -> list[str]:
    """Plain lowercase words that are single tokens of the model's vocabulary."""
    tok = Tokenizer.from_file(str(tokenizer_path))
    words = sorted(w for w in tok.get_vocab() if WORD.match(w))
    if len(words) < 20:  # a tokenizer without whole-word entries: fall back to a fixed list
        words = sorted(set(" ".join(FIDELITY_SENTENCES).lower().replace(".", "").split()))
    rng = random.Random(seed)
    rng.shuffle(words)
    return sorted(words[:limit])


def make_text(rng: random.Random, words: list[str], min_words: int, max_words: int) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words)))


def make_shapes(
    tokenizer_path: Path, words: list[str], max_tokens: int, batch_size: int = 32
) -> list[Shape]:
    """Short (~10 tokens) and medium (~128 tokens) texts, one per request or `batch_size`."""
    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_padding()
    tok.enable_truncation(max_tokens)
    rng = random.Random(1)
    sample = [make_text(rng, words, 1, 1) for _ in range(400)]
    per_word = sum(len(e.ids) - 2 for e in tok.encode_batch(sample)) / len(sample)
    per_word = max(per_word, 1.0)
    out = []
    for length, target in (("short", 10), ("medium", 128)):
        mid = max(1, round((target - 2) / per_word))
        spread = max(1, mid // 6)
        lo, hi = max(1, mid - spread), mid + spread
        rng = random.Random(2)
        texts = [make_text(rng, words, lo, hi) for _ in range(300)]
        tokens = sum(len(e.ids) for e in tok.encode_batch(texts)) / len(texts)
        for per_request in (1, batch_size):
            kind = "single" if per_request == 1 else "batch"
            out.append(Shape(f"{length}-{kind}", length, lo, hi, per_request, round(tokens, 1)))
    return out


def short_single(models_dir: Path, model: str) -> tuple[Shape, list[str]]:
    """The "short-single" shape of an exported model and the words it draws texts from."""
    from appliance.models.manifest import read_manifest

    manifest = read_manifest(models_dir / model)
    tokenizer = models_dir / model / manifest.files["tokenizer"].path
    words = vocabulary_words(tokenizer)
    shapes = make_shapes(tokenizer, words, manifest.max_tokens)
    return next(s for s in shapes if s.name == "short-single"), words
