"""CLIP: text and image vectors in one space, and zero-shot image (or text) classification.

The model folder holds the two towers as separate INT8 files ("model" = vision tower,
"text_model" = text tower; see exporters/vision.py for why). Each item is an image or a text;
without labels the answer is its L2-normalised embedding, with labels a softmax over
logit_scale x cosine to one prompt per label: "a photo of a {label}." for images
(manifest.config["prompt_template"]) and the bare label for texts
("text_prompt_template"). Items of one batch may mix texts and images: `infer` runs each
tower once over all of them, and embeds each distinct prompt once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from appliance.errors import InputTooLong, ValidationFailed
from appliance.models.manifest import Manifest
from appliance.runtime.images import decode_sized, image_tokens, require_image
from appliance.runtime.tokenizer import Encoded, TextTokenizer
from appliance.tasks.base import ItemResult, Runner, require_text
from appliance.tasks.embed import l2_normalise
from appliance.tasks.image import parse_labels, preprocessor_of, visual_tokens_of
from appliance.tasks.labels import label_output, softmax

PROMPT_TEMPLATE = "a photo of a {label}."
TEXT_PROMPT_TEMPLATE = "{label}"
TEXT_CHUNK = 64
"""Texts per text-tower call: a batch of many items with many labels stays bounded in memory."""
PROMPT_CACHE = 4096
"""Label prompt embeddings kept in memory: the same labels come back request after request, so
an image request usually runs the vision tower alone."""


@dataclass(frozen=True, slots=True)
class ClipInput:
    text: str | None = None
    image: str | None = None
    """Base64 text (less a data-URL prefix): the response cache keys on it."""
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class ClipItem:
    text: Encoded | None
    pixels: np.ndarray | None
    labels: tuple[str, ...] | None
    prompts: list[Encoded]
    tokens: int

    @property
    def truncated(self) -> bool:
        query = [self.text] if self.text is not None else []
        return any(e.truncated for e in query + self.prompts)


class ClipRunner(Runner[ClipInput, ClipItem, np.ndarray]):
    task = "zero-shot-image-classification"

    def __init__(self, folder: Path, manifest: Manifest, session: ort.InferenceSession) -> None:
        super().__init__(folder, manifest, session)
        # The text tower gets the same options and providers as the session the registry made.
        self.text_session = ort.InferenceSession(
            str(folder / manifest.files["text_model"].path),
            sess_options=session.get_session_options(),
            providers=session.get_providers(),
        )
        self._text_inputs = {i.name for i in self.text_session.get_inputs()}
        self.tokenizer = TextTokenizer(
            folder / manifest.files["tokenizer"].path,
            max_tokens=manifest.max_tokens,
            pad_token_id=manifest.pad_token_id,
        )
        self.preprocessor = preprocessor_of(manifest)
        self.visual_tokens = visual_tokens_of(manifest)
        self.logit_scale = float(manifest.config["logit_scale"])
        self.prompt_template = str(manifest.config.get("prompt_template", PROMPT_TEMPLATE))
        self.text_prompt_template = str(
            manifest.config.get("text_prompt_template", TEXT_PROMPT_TEMPLATE)
        )
        # Touched only by the model's one worker thread (and warm-up before it starts).
        self._prompt_cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()

    def parse_input(self, payload: Any) -> ClipInput:
        if not isinstance(payload, dict):
            raise ValidationFailed("`input` must be an object.", details={"field": "input"})
        has_text, has_image = payload.get("text") is not None, payload.get("image") is not None
        if has_text == has_image:
            raise ValidationFailed(
                "Give either `image` (base64 JPEG, PNG or WebP) or `text`.",
                details={"field": "image" if not has_text else "text"},
            )
        labels = parse_labels(payload)
        if has_text:
            return ClipInput(text=require_text(payload), labels=labels)
        return ClipInput(image=require_image(payload), labels=labels)

    def preprocess(self, inputs: list[ClipInput], *, truncate: bool = True) -> list[ClipItem]:
        queries = [i.text for i in inputs if i.text is not None]
        encoded = iter(self.tokenizer.encode(queries) if queries else [])
        items = []
        for i in inputs:
            text = next(encoded) if i.text is not None else None
            pixels: np.ndarray | None = None
            tokens = text.n_tokens if text is not None else 0
            if i.image is not None:
                image, (width, height) = decode_sized(i.image, min_side=self.preprocessor.min_side)
                pixels = self.preprocessor(image)
                tokens = image_tokens(width, height, self.visual_tokens)
            template = self.text_prompt_template if text is not None else self.prompt_template
            prompts = (
                self.tokenizer.encode([template.format(label=label) for label in i.labels])
                if i.labels
                else []
            )
            tokens += sum(p.n_tokens for p in prompts)
            items.append(ClipItem(text, pixels, i.labels, prompts, tokens))
        if not truncate and any(item.truncated for item in items):
            raise InputTooLong(
                f"Input is longer than the model's {self.manifest.max_tokens} tokens and "
                "truncation was turned off.",
                details={"max_tokens": self.manifest.max_tokens},
            )
        return items

    def cost(self, item: ClipItem) -> int:
        return item.tokens

    def _run_text(self, encodings: list[Encoded]) -> np.ndarray:
        """Embeddings of the texts, in order; shortest first so padding stays small."""
        order = sorted(range(len(encodings)), key=lambda i: encodings[i].n_tokens)
        parts = []
        for start in range(0, len(order), TEXT_CHUNK):
            arrays = self.tokenizer.pad([encodings[i] for i in order[start : start + TEXT_CHUNK]])
            feeds = {k: v for k, v in arrays.items() if k in self._text_inputs}
            parts.append(self.text_session.run(None, feeds)[0])
        stacked = np.concatenate(parts)
        out = np.empty_like(stacked)
        out[order] = stacked
        return out

    def _embed_prompts(self, prompts: list[Encoded]) -> dict[tuple[int, ...], np.ndarray]:
        cache = self._prompt_cache
        wanted = {tuple(p.ids): p for p in prompts}
        missing = [p for key, p in wanted.items() if key not in cache]
        if missing:
            for p, vector in zip(missing, self._run_text(missing), strict=True):
                cache[tuple(p.ids)] = vector
        found = {}
        for key in wanted:
            cache.move_to_end(key)
            found[key] = cache[key]
        while len(cache) > PROMPT_CACHE:
            cache.popitem(last=False)
        return found

    def infer(self, batch: list[ClipItem]) -> list[np.ndarray]:
        vectors: list[np.ndarray | None] = [None] * len(batch)
        images = [n for n, item in enumerate(batch) if item.pixels is not None]
        if images:
            pixels = np.stack([batch[n].pixels for n in images])  # type: ignore[misc]
            embeds = self.session.run(None, self.feeds({"pixel_values": pixels}))[0]
            for n, vector in zip(images, embeds, strict=True):
                vectors[n] = vector
        texts = [n for n, item in enumerate(batch) if item.text is not None]
        if texts:
            embeds = self._run_text([batch[n].text for n in texts])  # type: ignore[misc]
            for n, vector in zip(texts, embeds, strict=True):
                vectors[n] = vector
        prompts = self._embed_prompts([p for item in batch for p in item.prompts])
        out = []
        for item, vector in zip(batch, vectors, strict=True):
            assert vector is not None
            query = l2_normalise(vector.astype(np.float32))
            if not item.labels:
                out.append(query)
                continue
            labels = l2_normalise(np.stack([prompts[tuple(p.ids)] for p in item.prompts]))
            logits = self.logit_scale * (labels.astype(np.float64) @ query.astype(np.float64))
            out.append(softmax(logits))
        return out

    def postprocess(self, item: ClipItem, raw: np.ndarray) -> ItemResult:
        if item.labels:
            output = label_output(item.labels, raw)
        else:
            output = {"vector": raw.tolist()}
        return ItemResult(output, tokens=item.tokens, truncated=item.truncated)
