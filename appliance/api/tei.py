"""Hugging Face text-embeddings-inference (TEI) routes, so TEI clients and frameworks' TEI
integrations can point at the appliance: POST /embed, POST /predict, POST /tokenize, GET /info
(POST /rerank lives in api/rerank.py).

Bodies and answers have TEI's shapes; errors keep the appliance's one JSON body, with the
statuses TEI gives (422 validation, 413 body too large, 429 rate limit). TEI serves one model;
here a request may name one with `model`, else the default of its kind is used (config
[defaults], else the first installed model of that kind the key may use).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from litestar import Request, Response, get, post

import appliance
from appliance.api.responses import inference_response
from appliance.api.schemas import Text, Texts
from appliance.api.tasks import VECTORISE, Endpoint, Work, as_batch, work_of
from appliance.errors import Forbidden, ModelNotFound, ValidationFailed
from appliance.inference import Outcome
from appliance.models.registry import ModelEntry

EMBEDDING, CLASSIFIER, RERANKER = "feature-extraction", "text-classification", "text-ranking"

KINDS: dict[str, tuple[str, ...]] = {
    "embedding": (EMBEDDING,),
    "classifier": (CLASSIFIER,),
    # An embedding model reranks too (by cosine): the weaker choice, so it comes second.
    "reranker": (RERANKER, EMBEDDING),
}
_EXPORT_HINT = {
    "embedding": "--task feature-extraction",
    "classifier": "--task text-classification",
    "reranker": "--task text-ranking",
}
_ALSO = {"reranker": "; an embedding model also reranks, by cosine similarity"}
Right = Literal["right", "Right"]
"""TEI's truncation_direction: texts are cut at their end; "left" is refused (422), not ignored."""

# What GET /info and /tokenize describe when no model is named: TEI serves one model, most
# often an embedding model.
INFO_ORDER = ("embedding", "classifier", "reranker")


def default_model(work: Work, kind: str) -> str:
    """The slug a route of `kind` uses when the request names no model: config [defaults],
    else the first installed model of a task of that kind (in KINDS order) the key may use."""
    configured: str = getattr(work.settings.defaults, kind)
    if configured:
        return configured
    installed = [e for e in work.inference.registry.entries() if e.is_active and e.manifest]
    entries = [e for e in installed if work.call.key.allows_model(e.slug)]
    for task in KINDS[kind]:
        for entry in entries:
            assert entry.manifest is not None
            if entry.manifest.task == task:
                return entry.slug
    if any(e.manifest and e.manifest.task in KINDS[kind] for e in installed):
        # There is one, but not for this key: the 403 naming a model would give, not a
        # 404 telling its owner to export what is installed.
        raise Forbidden(
            f"This API key may use no installed {kind} model (the key's `models` list).",
            details={"kind": kind},
        )
    raise ModelNotFound(
        f"No {kind} model is installed: `appliance export CHECKPOINT {_EXPORT_HINT[kind]}` "
        f"adds one{_ALSO.get(kind, '')} (or name one with `model`).",
        details={"kind": kind},
    )


def _any_default(work: Work) -> str:
    refused: Forbidden | None = None
    for kind in INFO_ORDER:
        try:
            return default_model(work, kind)
        except ModelNotFound:
            continue
        except Forbidden as exc:
            refused = refused or exc
    if refused is not None:
        raise refused
    raise ModelNotFound(
        "No embedding, classifier or reranker model is installed.", details={"kind": "any"}
    )


def _prompted(entry: ModelEntry, texts: list[str], prompt_name: str | None) -> list[str]:
    """The texts behind the model's named prompt (sentence-transformers' `prompts`, kept in
    the manifest's config), e.g. "query: " for models trained with instructions."""
    if prompt_name is None:
        return texts
    assert entry.manifest is not None
    prompts = entry.manifest.config.get("prompts") or {}
    if prompt_name not in prompts:
        raise ValidationFailed(
            f"Model '{entry.slug}' has no prompt '{prompt_name}'"
            + (f" (it has: {', '.join(sorted(prompts))})." if prompts else " (it has none)."),
            details={"field": "prompt_name", "prompts": sorted(prompts)},
        )
    return [prompts[prompt_name] + t for t in texts]


# ---- POST /embed -------------------------------------------------------------------------
class TEIEmbedBody(msgspec.Struct, kw_only=True):
    inputs: Text | Annotated[list[Text], msgspec.Meta(min_length=1)]
    """A text or a list of texts (the answer is a list of vectors either way)."""
    normalize: bool = True
    """L2-normalise each vector (after `dimensions` cuts it)."""
    truncate: bool | None = None
    """Cut texts longer than the model takes (X-Truncated says so); false: 422. Default true."""
    truncation_direction: Right = "right"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Keep the first N dimensions (Matryoshka models); at most the model's dimension."""
    prompt_name: str | None = None
    """A prompt of the model's (its manifest's config `prompts`) put before each text."""
    model: str | None = None
    """A slug or alias; default: [defaults] embedding, else the first embedding model."""


def _shape(vector: list[float], dimensions: int | None, normalize: bool) -> list[float]:
    v = np.asarray(vector, dtype=np.float32)
    if dimensions is not None:
        if dimensions > v.shape[0]:
            raise ValidationFailed(
                f"`dimensions` is {dimensions}; this model's vectors have {v.shape[0]}.",
                details={"field": "dimensions", "max": int(v.shape[0])},
            )
        v = v[:dimensions]
    if normalize:
        v = v / max(float(np.linalg.norm(v)), 1e-12)
    return v.tolist()  # type: ignore[no-any-return]


async def embed(data: TEIEmbedBody, work: Work) -> tuple[list[list[float]], Outcome]:
    """The work of POST /embed."""
    texts, _ = as_batch(data.inputs, "inputs", work.settings.server.max_batch_items)
    ref = data.model or default_model(work, "embedding")
    if data.prompt_name is not None or data.dimensions is not None:
        entry = work.inference.model_for(ref, work.call.key, VECTORISE, "embed")
        texts = _prompted(entry, texts, data.prompt_name)
        size = entry.manifest.dimension if entry.manifest else None
        if size and data.dimensions and data.dimensions > size:  # refused before any charge
            raise ValidationFailed(
                f"`dimensions` is {data.dimensions}; this model's vectors have {size}.",
                details={"field": "dimensions", "max": size},
            )
    # normalize=false asks an embedding model for its pooled vectors as they are (cached
    # apart); CLIP text vectors come L2-normalised whatever the flag (their space is cosine).
    extra = {} if data.normalize else {"normalize": False}
    outcome = await work.inference.run(
        ref,
        [{"text": t, **extra} for t in texts],
        call=work.call,
        tasks=VECTORISE,
        truncate=data.truncate is not False,
        endpoint="embed",
        priority=work.priority,
    )
    vectors = [_shape(r.output["vector"], data.dimensions, data.normalize) for r in outcome.results]
    return vectors, outcome


@post("/embed", opt={"scope": "predict"}, tags=["tei"], status_code=200)
async def embed_route(
    data: TEIEmbedBody, request: Request[Any, Any, Any]
) -> Response[list[list[float]]]:
    """TEI's embed: one vector per input text, in order."""
    work = work_of(request)
    return inference_response(*await embed(data, work))


# ---- POST /predict -----------------------------------------------------------------------
Sequence = Annotated[list[Text], msgspec.Meta(min_length=1, max_length=2)]


class TEIPredictBody(msgspec.Struct, kw_only=True):
    inputs: Text | list[Text | Sequence]
    """As TEI takes it: a text, ["text"] (one text), or a batch [["text"], ["text"], ...]. A
    pair ["text", "text"] is TEI's sentence-pair input, which this server refuses (422)."""
    truncate: bool | None = None
    """Cut texts longer than the model takes (X-Truncated says so); false: 422. Default true."""
    truncation_direction: Right = "right"
    raw_scores: bool = False
    """The logits instead of the softmax (sigmoid for multi-label models)."""
    model: str | None = None
    """A classifier's slug; default: [defaults] classifier, else the first one installed."""


class Prediction(msgspec.Struct):
    score: float
    label: str


def _sequences(inputs: str | list[Any]) -> tuple[list[str], bool]:
    """(texts, was_batch) from TEI's input forms."""

    def one(seq: list[str]) -> str:
        if len(seq) != 1:
            raise ValidationFailed(
                "Sentence pairs are not supported: send a text, or a batch [[text], ...].",
                details={"field": "inputs"},
            )
        return seq[0]

    if isinstance(inputs, str):
        return [inputs], False
    if not inputs:
        raise ValidationFailed("`inputs` must not be empty.", details={"field": "inputs"})
    if all(isinstance(i, str) for i in inputs):
        return [one(inputs)], False
    if not all(isinstance(i, list) for i in inputs):
        raise ValidationFailed(
            "`inputs` mixes texts and lists: send a text or a batch [[text], ...].",
            details={"field": "inputs"},
        )
    return [one(i) for i in inputs], True


async def predict(data: TEIPredictBody, work: Work) -> tuple[Any, Outcome]:
    """The work of POST /predict."""
    texts, batch = _sequences(data.inputs)
    texts, _ = as_batch(texts, "inputs", work.settings.server.max_batch_items)
    extra = {"raw_scores": True} if data.raw_scores else {}
    outcome = await work.inference.run(
        data.model or default_model(work, "classifier"),
        [{"text": t, **extra} for t in texts],
        call=work.call,
        tasks={CLASSIFIER},
        truncate=data.truncate is not False,
        endpoint="predict",
        priority=work.priority,
    )
    answers = [
        sorted(
            (Prediction(score, label) for label, score in r.output["probabilities"].items()),
            key=lambda p: p.score,
            reverse=True,
        )
        for r in outcome.results
    ]
    return (answers if batch else answers[0]), outcome


@post("/predict", opt={"scope": "predict"}, tags=["tei"], status_code=200)
async def predict_route(
    data: TEIPredictBody, request: Request[Any, Any, Any]
) -> Response[list[Prediction] | list[list[Prediction]]]:
    """TEI's predict: every label with its score, highest first (a list per text for a batch)."""
    work = work_of(request)
    return inference_response(*await predict(data, work))


# ---- POST /tokenize ----------------------------------------------------------------------
class TEITokenizeBody(msgspec.Struct, kw_only=True):
    inputs: str | Texts
    add_special_tokens: bool = True
    """Include the model's special tokens ([CLS], [SEP], ...)."""
    prompt_name: str | None = None
    """A prompt of the model's put before each text, as /embed does."""
    model: str | None = None
    """Any model with a text tokenizer; default: the one GET /info describes."""


class SimpleToken(msgspec.Struct):
    id: int
    text: str
    special: bool
    start: int | None
    """UTF-8 byte offset of the token in the text (null for special tokens), as TEI gives it."""
    stop: int | None


async def tokenize(data: TEITokenizeBody, work: Work) -> tuple[list[list[SimpleToken]], Outcome]:
    """The work of POST /tokenize: the tokens of each text (all of them: nothing is cut)."""
    texts, _ = as_batch(data.inputs, "inputs", work.settings.server.max_batch_items)
    ref = data.model or _any_default(work)
    if data.prompt_name is not None:
        entry = work.inference.model_for(ref, work.call.key, None, "tokenize")
        texts = _prompted(entry, texts, data.prompt_name)
    outcome = await work.inference.tokenize(
        ref,
        texts,
        call=work.call,
        add_special_tokens=data.add_special_tokens,
        endpoint="tokenize",
    )
    rows = [
        [SimpleToken(t.id, t.text, t.special, t.start, t.stop) for t in r.output["tokens"]]
        for r in outcome.results
    ]
    return rows, outcome


@post("/tokenize", opt={"scope": "predict"}, tags=["tei"], status_code=200)
async def tokenize_route(
    data: TEITokenizeBody, request: Request[Any, Any, Any]
) -> Response[list[list[SimpleToken]]]:
    """TEI's tokenize: each text's tokens with their ids and byte offsets (nothing charged)."""
    work = work_of(request)
    return inference_response(*await tokenize(data, work))


# ---- GET /info ---------------------------------------------------------------------------
class TEIInfo(msgspec.Struct):
    model_id: str
    model_sha: str | None
    model_dtype: str
    served_model_name: str
    model_type: dict[str, Any]
    """{"embedding": {"pooling"}}, {"classifier": {"id2label", "label2id"}} or
    {"reranker": {...}}, as TEI names the kind."""
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None = None
    docker_label: str | None = None


def _model_type(entry: ModelEntry) -> dict[str, Any]:
    m = entry.manifest
    assert m is not None
    if m.task == EMBEDDING:
        return {"embedding": {"pooling": m.pooling or "mean"}}
    labels = m.labels or ["LABEL_0"]
    id2label = {str(i): label for i, label in enumerate(labels)}
    table = {"id2label": id2label, "label2id": {label: i for i, label in enumerate(labels)}}
    return {"reranker" if m.task == RERANKER else "classifier": table}


@get("/info", opt={"scope": "predict"}, tags=["tei"])
async def info(request: Request[Any, Any, Any], model: str | None = None) -> TEIInfo:
    """TEI's info about a model (`model`, else the default embedding model, else the default
    classifier, else the default reranker): its id, kind, limits and this server's version."""
    work = work_of(request)
    entry = work.inference.model_for(
        model or _any_default(work), work.call.key, (EMBEDDING, CLASSIFIER, RERANKER), "info"
    )
    m = entry.manifest
    assert m is not None
    runtime = work.settings.runtime
    return TEIInfo(
        model_id=entry.slug,
        model_sha=m.fingerprint,
        model_dtype="int8" if "int8" in m.quantization.method.lower() else "float32",
        served_model_name=entry.slug,
        model_type=_model_type(entry),
        max_concurrent_requests=runtime.max_queue,
        max_input_length=m.max_tokens,
        max_batch_tokens=runtime.max_batch_tokens,
        max_batch_requests=runtime.max_batch_size,
        max_client_batch_size=work.settings.server.max_batch_items,
        auto_truncate=True,
        tokenization_workers=1,
        version=appliance.__version__,
    )


ROUTES = [embed_route, predict_route, tokenize_route, info]
ENDPOINTS: dict[str, Endpoint] = {
    "/embed": Endpoint(TEIEmbedBody, embed),
    "/predict": Endpoint(TEIPredictBody, predict),
    "/tokenize": Endpoint(TEITokenizeBody, tokenize),
}
"""Each POST path of this module to its body type and work (batch jobs run them per line)."""
