"""Tokenisation with the `tokenizers` library: per-item encoding, then dynamic padding per batch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

INLINE_CHARS = 4096
"""Up to this many characters of text, tokenising runs on the event loop holding the GIL
(tens of microseconds to ~2 ms); longer inputs are tokenised in a worker thread, by
encode_batch, which lets the GIL go, so they cannot stall the loop or the model threads."""


@dataclass(frozen=True, slots=True)
class Encoded:
    """One tokenised text (or text pair), unpadded."""

    ids: list[int]
    type_ids: list[int]
    truncated: bool

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


@dataclass(frozen=True, slots=True)
class Token:
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class TextTokenizer:
    def __init__(self, path: Path, *, max_tokens: int, pad_token_id: int) -> None:
        self._tok = Tokenizer.from_file(str(path))
        # Some shipped tokenizer.json files pad every input to a fixed length (all-MiniLM-L6-v2
        # pads to 128): short texts would cost as much as long ones. Pad per batch instead.
        self._tok.no_padding()
        self._tok.enable_truncation(max_tokens)
        self.max_tokens = max_tokens
        self._whole: Tokenizer | None = None
        self.pad_token_id = pad_token_id

    def encode(self, texts: list[str], pairs: list[str] | None = None) -> list[Encoded]:
        pair = pairs[0] if pairs is not None and len(pairs) == 1 else None
        if len(texts) == 1 and len(texts[0]) + len(pair or "") <= INLINE_CHARS:
            # One short text, most requests: `encode` skips encode_batch's hand-off to its
            # thread pool and back (a third of the call for a short text). It holds the GIL
            # throughout, so a long text goes to encode_batch, which lets it go: encode
            # stalled every other thread for the whole of a 1 MB text (~0.6 s).
            encodings = [self._tok.encode(texts[0], pair)]
        else:
            inputs = list(zip(texts, pairs, strict=True)) if pairs is not None else texts
            encodings = self._tok.encode_batch(inputs)  # type: ignore[arg-type]
        return [
            Encoded(ids=e.ids, type_ids=e.type_ids, truncated=bool(e.overflowing))
            for e in encodings
        ]

    def tokens(self, texts: list[str], *, add_special_tokens: bool = True) -> list[list[Token]]:
        """Every token of each text, untruncated (what a client checks lengths with), with
        UTF-8 byte offsets into the text as TEI gives them; special tokens have none."""
        if self._whole is None:  # a copy: truncation is a setting of the shared tokenizer
            self._whole = Tokenizer.from_str(self._tok.to_str())
            self._whole.no_truncation()
        encodings = self._whole.encode_batch(texts, add_special_tokens=add_special_tokens)
        out = []
        for text, e in zip(texts, encodings, strict=True):
            row = []
            for token_id, token, (start, stop), special in zip(
                e.ids, e.tokens, e.offsets, e.special_tokens_mask, strict=True
            ):
                if special:
                    row.append(Token(token_id, token, True, None, None))
                    continue
                begin = len(text[:start].encode())
                piece = text[start:stop]
                row.append(Token(token_id, piece, False, begin, begin + len(piece.encode())))
            out.append(row)
        return out

    def pad(self, batch: list[Encoded]) -> dict[str, np.ndarray]:
        length = max(e.n_tokens for e in batch)
        ids = np.full((len(batch), length), self.pad_token_id, dtype=np.int64)
        types = np.zeros((len(batch), length), dtype=np.int64)
        mask = np.zeros((len(batch), length), dtype=np.int64)
        for row, e in enumerate(batch):
            ids[row, : e.n_tokens] = e.ids
            types[row, : e.n_tokens] = e.type_ids
            mask[row, : e.n_tokens] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
