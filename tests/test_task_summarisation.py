"""Summarisation end to end: tiny T5 and BART checkpoints (random weights made decisive, offline
tokenizers) exported and quantised by the exporter, run by the runner and served, and compared
token for token with the PyTorch model's own generate().

Two kinds of comparison. The runner's decoding (greedy, beams, length penalty, lengths,
n-gram ban, repetition penalty, forced tokens, batching) must be transformers' exactly: that is
checked over a wide matrix with the optimum fp32 graphs in place of the INT8 ones, where
nothing but the algorithm can differ. The INT8 model must give PyTorch's tokens on a fixed set
of texts and settings (greedy and beams) on which these decisive tiny models keep their
choices under every candidate decoder scheme (random weights have near-ties that INT8 noise,
per-batch activation scales included, can flip; a trained model has far fewer).

The HTTP task-API tests (POST /v1/summarisation) skip until appliance.api.summarise.ROUTES is
wired into appliance/app.py; the runner and the predict API are tested either way."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from litestar.testing import TestClient

from appliance.config import RuntimeConfig
from appliance.errors import InputTooLong, ValidationFailed
from appliance.models.manifest import file_entry, read_manifest
from appliance.runtime.session import create_session
from appliance.tasks import Runner, build_runner
from exporters.samples import SAMPLE_TEXTS
from exporters.seq2seq import DECODER_SCHEMES
from tests.seq2seq_models import DOCUMENTS, build_tiny_bart, build_tiny_t5

MODELS = ("tiny-t5", "tiny-bart")
BUILDERS = {
    # Seeds whose tiny models are decisive on the texts below under every decoder scheme.
    "tiny-t5": functools.partial(build_tiny_t5, seed=6),
    "tiny-bart": functools.partial(build_tiny_bart, seed=0),
}
URL = "/v1/summarisation"
GREEDY_TEXTS = [*DOCUMENTS[:4], SAMPLE_TEXTS[0], SAMPLE_TEXTS[6], SAMPLE_TEXTS[12]]
BEAM_TEXTS = DOCUMENTS[:3]
PLAIN = {"min_length": 0, "num_beams": 1, "no_repeat_ngram_size": 0, "repetition_penalty": 1.0}
"""Overrides the checkpoints' defaults (T5's are beams with no-repeat n-grams)."""


@pytest.fixture(scope="module")
def s2s_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("s2s-checkpoints")
    return {slug: build(root / slug) for slug, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def s2s_models(tmp_path_factory: pytest.TempPathFactory, s2s_checkpoints: dict[str, Path]) -> Path:
    from exporters.export import export_model

    out = tmp_path_factory.mktemp("s2s-models")
    for slug, folder in s2s_checkpoints.items():
        export_model(folder, "summarisation", out_dir=out, slug=slug)
    return out


@pytest.fixture(scope="module")
def runners(s2s_models: Path) -> dict[str, Runner]:
    """The runners as the registry builds them: a session on files["model"] (the encoder)."""
    out = {}
    for slug in MODELS:
        folder = s2s_models / slug
        manifest = read_manifest(folder)
        session = create_session(folder / manifest.files["model"].path, RuntimeConfig())
        out[slug] = build_runner(folder, manifest, session)
    return out


@pytest.fixture(scope="module")
def fp32_runners(
    tmp_path_factory: pytest.TempPathFactory,
    s2s_models: Path,
    s2s_checkpoints: dict[str, Path],
) -> dict[str, Runner]:
    """The exported folders with optimum's fp32 encoder and merged decoder put back in."""
    from exporters.seq2seq import _onnx_export

    root = tmp_path_factory.mktemp("s2s-fp32")
    out = {}
    for slug in MODELS:
        graphs, folder = root / f"{slug}-onnx", root / slug
        _onnx_export(s2s_checkpoints[slug], graphs)
        shutil.copytree(s2s_models / slug, folder)
        shutil.copyfile(graphs / "encoder_model.onnx", folder / "encoder.onnx")
        shutil.copyfile(graphs / "decoder_model_merged.onnx", folder / "decoder.onnx")
        manifest = read_manifest(folder)
        for role, name in (("model", "encoder"), ("encoder", "encoder"), ("decoder", "decoder")):
            manifest.files[role] = file_entry(folder, f"{name}.onnx")
        session = create_session(folder / "encoder.onnx", RuntimeConfig())
        out[slug] = build_runner(folder, manifest, session)
    return out


@functools.cache
def _torch(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    return AutoModelForSeq2SeqLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(
        folder
    )


def torch_ids(folder: Path, text: str, **params: Any) -> list[int]:
    """transformers' generate() on the PyTorch model, with the API's parameters (lengths count
    summary tokens): the summary's ids, without the start token, cut at EOS."""
    import torch

    model, tok = _torch(folder)
    task = (model.config.task_specific_params or {}).get("summarization", {})
    inputs = tok(task.get("prefix", "") + text, return_tensors="pt", truncation=True)
    threads = torch.get_num_threads()
    # One thread: a model this small only waits on the other (badly so on a busy machine).
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=params["max_length"],
                min_new_tokens=params.get("min_length", 0),
                num_beams=params.get("num_beams", 1),
                length_penalty=params.get("length_penalty", 1.0),
                no_repeat_ngram_size=params.get("no_repeat_ngram_size", 0),
                repetition_penalty=params.get("repetition_penalty", 1.0),
                early_stopping=False,
                do_sample=False,
            )
    finally:
        torch.set_num_threads(threads)
    ids = [int(t) for t in out[0, 1:]]
    eos = model.generation_config.eos_token_id
    return ids[: ids.index(eos)] if eos in ids else ids


def summarise_ids(runner: Runner, texts: list[str], **params: Any) -> list[list[int]]:
    """The runner's best sequence for each text, all in one batch."""
    items = runner.preprocess([runner.parse_input({"text": t, **params}) for t in texts])
    return [raw[0] for raw in runner.infer(items)]


def decode(folder: Path, ids: list[int]) -> str:
    _, tok = _torch(folder)
    return str(tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


# ---- export ----------------------------------------------------------------------------------


@pytest.mark.parametrize("slug", MODELS)
def test_export_keeps_encoder_and_merged_decoder_and_records_the_choice(
    s2s_models: Path, slug: str
) -> None:
    folder = s2s_models / slug
    manifest = read_manifest(folder)
    assert manifest.task == "summarisation"
    assert sorted(manifest.files) == ["decoder", "encoder", "model", "tokenizer"]
    assert manifest.files["model"] == manifest.files["encoder"]
    assert manifest.files["encoder"].path == "encoder.onnx"
    assert manifest.files["decoder"].path == "decoder.onnx"
    assert sorted(p.name for p in folder.iterdir()) == [
        "decoder.onnx",
        "encoder.onnx",
        "manifest.json",
        "tokenizer.json",
    ]
    assert manifest.inputs == ["input_ids", "attention_mask"]
    schemes = {s["scheme"]: s for s in manifest.exporter["schemes"]}
    assert set(schemes) == set(DECODER_SCHEMES)
    chosen = manifest.exporter["chosen_scheme"]
    assert manifest.quantization.method == chosen
    assert manifest.exporter["encoder_quantization"]["method"] == "dynamic-int8"
    assert manifest.exporter["encoder_quantization"]["per_channel"] is True
    assert manifest.validation is not None and manifest.validation.passed
    metrics = manifest.validation.metrics
    # 16 tokens a text, EOS suppressed: past where these tiny models are decisive.
    assert metrics["greedy_agreement"] >= 0.75
    assert manifest.validation.thresholds == {"greedy_agreement": 0.5}
    assert metrics["encoder_min_cosine"] > 0.99
    assert metrics["tokens_per_second"] > metrics["torch_tokens_per_second"]
    fastest = max(s["tokens_per_second"] for s in schemes.values() if s["agreement"] >= 0.5)
    assert metrics["tokens_per_second"] == pytest.approx(fastest, rel=1e-3)
    sizes = manifest.sizes
    assert sizes["decoder_int8_bytes"] == schemes[chosen]["size_bytes"]
    assert sizes["int8_bytes"] == sizes["encoder_int8_bytes"] + sizes["decoder_int8_bytes"]
    assert sizes["int8_bytes"] < sizes["fp32_bytes"]
    cfg = manifest.config
    assert cfg["decoder"] == "merged" and cfg["num_layers"] == 2
    assert (cfg["num_heads"], cfg["head_dim"]) == (2, 16)
    assert len(cfg["self_past_inputs"]) == len(cfg["cross_past_inputs"]) == 4


def test_special_tokens_and_defaults_come_from_the_checkpoint(s2s_models: Path) -> None:
    t5 = read_manifest(s2s_models / "tiny-t5").config
    assert t5["prefix"] == "summarize: "
    assert (t5["decoder_start_token_id"], t5["eos_token_ids"], t5["pad_token_id"]) == (0, [1], 0)
    assert t5["forced_bos_token_id"] is None and t5["forced_eos_token_ids"] == []
    # task_specific_params["summarization"] (min_length 4, max_length 14 count the start token)
    assert t5["generation"] == {
        "min_length": 3,
        "max_length": 13,
        "num_beams": 3,
        "length_penalty": 1.5,
        "no_repeat_ngram_size": 3,
        "repetition_penalty": 1.0,
    }
    assert t5["max_new_tokens"] == 512  # relative positions: the exporter's own cap
    bart = read_manifest(s2s_models / "tiny-bart").config
    assert bart["prefix"] == ""
    assert (bart["decoder_start_token_id"], bart["eos_token_ids"]) == (2, [2])
    assert (bart["forced_bos_token_id"], bart["forced_eos_token_ids"]) == (0, [2])
    assert bart["generation"]["max_length"] == 19  # transformers' default max_length 20
    assert bart["max_new_tokens"] == 127  # max_position_embeddings 128


# ---- the same tokens as PyTorch: the INT8 model ----------------------------------------------


@pytest.mark.parametrize("slug", MODELS)
def test_greedy_matches_pytorch(
    runners: dict[str, Runner], s2s_checkpoints: dict[str, Path], slug: str
) -> None:
    params = {**PLAIN, "max_length": 12}
    ours = summarise_ids(runners[slug], GREEDY_TEXTS, **params)
    assert ours == [torch_ids(s2s_checkpoints[slug], t, **params) for t in GREEDY_TEXTS]
    # Different texts, different summaries; some end with EOS, some at max_length.
    assert len({tuple(o) for o in ours}) >= 3
    assert 12 - (slug == "tiny-bart") in {len(o) for o in ours}  # BART's forced EOS
    assert min(len(o) for o in ours) < 10


@pytest.mark.parametrize("slug", MODELS)
@pytest.mark.parametrize(
    "params",
    [
        {"max_length": 10, "num_beams": 3},
        {"max_length": 10, "num_beams": 4, "length_penalty": 2.0},
        {"max_length": 12, "num_beams": 3, "no_repeat_ngram_size": 2, "repetition_penalty": 1.3},
        {"min_length": 8, "max_length": 10},
    ],
    ids=["beams3", "beams4-length-penalty", "beams3-no-repeat-ngram-repetition", "min-length"],
)
def test_beam_search_and_lengths_match_pytorch(
    runners: dict[str, Runner],
    s2s_checkpoints: dict[str, Path],
    slug: str,
    params: dict[str, Any],
) -> None:
    params = {**PLAIN, **params}
    ours = summarise_ids(runners[slug], BEAM_TEXTS, **params)
    assert ours == [torch_ids(s2s_checkpoints[slug], t, **params) for t in BEAM_TEXTS]


@pytest.mark.parametrize("slug", MODELS)
def test_defaults_are_the_summarization_pipelines(
    runners: dict[str, Runner], s2s_checkpoints: dict[str, Path], s2s_models: Path, slug: str
) -> None:
    """No parameters: the checkpoint's defaults as transformers' summarization pipeline uses
    them (T5: task_specific_params' beams, n-gram ban, length penalty and prefix; BART: its
    generation config with forced <s> and </s>); the text is the tokenizer's decoding."""
    defaults = read_manifest(s2s_models / slug).config["generation"]
    runner = runners[slug]
    items = runner.preprocess([runner.parse_input({"text": t}) for t in BEAM_TEXTS])
    for text, item, raw in zip(BEAM_TEXTS, items, runner.infer(items), strict=True):
        expected = torch_ids(s2s_checkpoints[slug], text, **defaults)
        assert raw[0] == expected
        result = runner.postprocess(item, raw)
        assert result.output == {"output": decode(s2s_checkpoints[slug], expected).strip()}
        # Charged per beam: every beam is a decoder row that ran at least the summary's steps.
        beams = item.request.num_beams
        if beams == 1:
            assert result.tokens == item.n_input + len(expected)
        else:
            assert item.n_input + beams * len(expected) <= result.tokens <= runner.cost(item)


@pytest.mark.parametrize("slug", MODELS)
def test_min_and_max_length_are_respected(runners: dict[str, Runner], slug: str) -> None:
    runner = runners[slug]
    forced_eos = bool(runner.manifest.config["forced_eos_token_ids"])
    for low, high, beams in ((0, 3, 1), (5, 7, 1), (8, 8, 1), (6, 9, 3), (0, 1, 2)):
        params = {**PLAIN, "min_length": low, "max_length": high, "num_beams": beams}
        texts = [*DOCUMENTS, *SAMPLE_TEXTS]
        items = runner.preprocess([runner.parse_input({"text": t, **params}) for t in texts])
        for item, raw in zip(items, runner.infer(items), strict=True):
            n = len(raw[0])
            # A forced EOS takes the last place (transformers' forced_eos_token_id).
            lowest = min(low, high - 1) if forced_eos else low
            assert lowest <= n <= high, (low, high, n)
            assert runner.cost(item) == item.n_input + beams * high  # every beam reserved
            tokens = runner.postprocess(item, raw).tokens
            assert item.n_input + beams * n <= tokens <= runner.cost(item)
            if beams == 1:
                assert tokens == item.n_input + n


# ---- the same tokens as transformers: the decoding, on the fp32 graphs ------------------------

MATRIX = [
    {"max_length": 15},
    {"min_length": 10, "max_length": 12},
    {"min_length": 8, "max_length": 8},
    {"max_length": 1},
    {"max_length": 15, "num_beams": 3},
    {"max_length": 14, "num_beams": 4, "length_penalty": 2.0},
    {"max_length": 10, "num_beams": 2, "length_penalty": 0.5},
    {"min_length": 3, "max_length": 3, "num_beams": 2},
    {"max_length": 16, "no_repeat_ngram_size": 2},
    {"max_length": 16, "num_beams": 3, "no_repeat_ngram_size": 2, "repetition_penalty": 1.5},
    {"max_length": 12, "repetition_penalty": 1.8},
    {"max_length": 12, "num_beams": 3, "repetition_penalty": 0.7, "length_penalty": 1.5},
]


@pytest.mark.parametrize("slug", MODELS)
def test_decoding_is_transformers_exactly(
    fp32_runners: dict[str, Runner], s2s_checkpoints: dict[str, Path], slug: str
) -> None:
    """Every setting over every sample text (a truncated one too), each setting's texts in
    one batch: with fp32 graphs the tokens are generate()'s, setting by setting."""
    runner = fp32_runners[slug]
    texts = [*DOCUMENTS, *SAMPLE_TEXTS]
    defaults = runner.manifest.config["generation"]
    for params in [*({**PLAIN, **p} for p in MATRIX), {}]:
        ours = summarise_ids(runner, texts, **params)
        expected = [torch_ids(s2s_checkpoints[slug], t, **{**defaults, **params}) for t in texts]
        assert ours == expected, params


def test_a_batch_of_different_requests_answers_like_single_ones(
    fp32_runners: dict[str, Runner],
) -> None:
    """Greedy, beam and n-gram-banned items of different lengths in one model call: each
    search keeps its own rows of the batch (fan-out, early finishes, reordering)."""
    for runner in fp32_runners.values():
        requests = [
            {"text": DOCUMENTS[0], **PLAIN, "max_length": 9},
            {"text": DOCUMENTS[1], **PLAIN, "max_length": 12, "num_beams": 4},
            {"text": SAMPLE_TEXTS[15], **PLAIN, "max_length": 6, "no_repeat_ngram_size": 2},
            {"text": DOCUMENTS[2], **PLAIN, "min_length": 3, "max_length": 5, "num_beams": 2},
            {"text": SAMPLE_TEXTS[7]},
        ]
        items = runner.preprocess([runner.parse_input(r) for r in requests])
        together = runner.infer(items)
        alone = [runner.infer([item])[0] for item in items]
        assert together == alone


def test_decoding_loop_reproduces_pytorch_logits_through_the_cache(
    runners: dict[str, Runner], s2s_checkpoints: dict[str, Path]
) -> None:
    """Step by step through the self- and cross-attention caches, with two texts of different
    lengths in one batch (the shorter one padded in the encoder), the INT8 logits track
    PyTorch's full forward pass over the same decoder tokens."""
    import torch

    from appliance.tasks.decoding import DecodingConfig, SampleSearch, Step

    class Recording(SampleSearch):
        def __init__(self, prompt: list[int]) -> None:
            super().__init__(prompt, DecodingConfig(max_new_tokens=10, min_new_tokens=10))
            self.logits: list[np.ndarray] = []

        def step(self, logits: np.ndarray) -> Step:
            self.logits.append(logits[0].copy())
            return super().step(logits)

    for slug in MODELS:
        runner = runners[slug]
        model, tok = _torch(s2s_checkpoints[slug])
        texts = [DOCUMENTS[1], SAMPLE_TEXTS[1]]
        items = runner.preprocess([runner.parse_input({"text": t}) for t in texts])
        assert items[0].n_input > items[1].n_input
        start = runner.manifest.config["decoder_start_token_id"]
        searches = [Recording([start]) for _ in items]
        runner.loop.generate(list(searches), runner.tokenizer.pad([i.encoded for i in items]))
        for item, search in zip(items, searches, strict=True):
            decoder_ids = torch.tensor([[start, *search.results()[0][:-1]]])
            with torch.inference_mode():
                reference = (
                    model(input_ids=torch.tensor([item.encoded.ids]), decoder_input_ids=decoder_ids)
                    .logits[0]
                    .numpy()
                )
            ours = np.stack(search.logits)
            cos = (ours * reference).sum(-1) / (
                np.linalg.norm(ours, axis=-1) * np.linalg.norm(reference, axis=-1)
            )
            assert cos.min() > 0.99, (slug, cos)
            # The same choice wherever PyTorch's is clear (EOS is suppressed here: past the
            # summaries' ends these random models have near-ties that INT8 noise can flip).
            top2 = np.sort(reference, axis=-1)[:, -2:]
            clear = top2[:, 1] - top2[:, 0] > 0.1 * reference.std(-1)
            assert (ours.argmax(-1) == reference.argmax(-1))[clear].all()
            assert clear.mean() > 0.5


def test_long_inputs_are_truncated_or_refused(runners: dict[str, Runner]) -> None:
    runner = runners["tiny-t5"]
    long_text = SAMPLE_TEXTS[15]
    [item] = runner.preprocess([runner.parse_input({"text": long_text, "max_length": 4})])
    assert item.encoded.truncated and item.n_input == runner.manifest.max_tokens
    result = runner.postprocess(item, runner.infer([item])[0])
    assert result.truncated and isinstance(result.output["output"], str)
    with pytest.raises(InputTooLong):
        runner.preprocess([runner.parse_input({"text": long_text})], truncate=False)


# ---- bad input: 422 naming the field, never 500 -----------------------------------------------

BAD_INPUTS = [
    ({"text": ""}, "text"),
    ({"text": "   "}, "text"),
    ({"text": 42}, "text"),
    ({}, "text"),
    ({"text": "hi", "min_length": 10, "max_length": 5}, "max_length"),
    ({"text": "hi", "max_length": 0}, "max_length"),
    ({"text": "hi", "max_length": 100000}, "max_length"),
    ({"text": "hi", "max_length": "long"}, "max_length"),
    ({"text": "hi", "min_length": -1}, "min_length"),
    ({"text": "hi", "min_length": 2.5}, "min_length"),
    ({"text": "hi", "num_beams": 0}, "num_beams"),
    ({"text": "hi", "num_beams": 1000}, "num_beams"),
    ({"text": "hi", "num_beams": True}, "num_beams"),
    ({"text": "hi", "length_penalty": "long"}, "length_penalty"),
    ({"text": "hi", "no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
    ({"text": "hi", "repetition_penalty": 0}, "repetition_penalty"),
]


@pytest.mark.parametrize(("payload", "field"), BAD_INPUTS)
def test_bad_inputs_are_refused_naming_the_field(
    runners: dict[str, Runner], payload: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        runners["tiny-bart"].parse_input(payload)
    assert caught.value.status_code == 422
    assert caught.value.details.get("field") == field, caught.value.message


def test_a_length_given_alone_moves_the_default_out_of_its_way(
    runners: dict[str, Runner],
) -> None:
    runner = runners["tiny-t5"]  # defaults: min_length 3, max_length 13
    assert runner.parse_input({"text": "hi", "max_length": 2}).min_length == 2
    assert runner.parse_input({"text": "hi", "min_length": 20}).max_length == 20
    parsed = runner.parse_input({"text": "hi", "max_length": 3.0})
    assert (parsed.min_length, parsed.max_length, parsed.num_beams) == (3, 3, 3)


# ---- HTTP ------------------------------------------------------------------------------------


@pytest.fixture
def served(serve: Callable[..., TestClient], s2s_models: Path) -> tuple[TestClient, dict[str, str]]:
    aliases = {"summarisation": {"english": "tiny-t5"}}
    client = serve(s2s_models, APPLIANCE_ENDPOINT_ALIASES=json.dumps(aliases))
    key = client.keys.create("s2s", ["predict"])[1]  # type: ignore[attr-defined]
    return client, {"x-api-key": key}


@pytest.fixture
def api(served: tuple[TestClient, dict[str, str]]) -> tuple[TestClient, dict[str, str]]:
    client, _ = served
    if not any(getattr(route, "path", "") == URL for route in client.app.routes):
        pytest.skip("POST /v1/summarisation is not wired into appliance/app.py yet")
    return served


def test_predict_api_summarises_and_validates(
    served: tuple[TestClient, dict[str, str]], runners: dict[str, Runner]
) -> None:
    client, auth = served
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    url = "/v1/models/tiny-bart/predict"
    body = {"text": DOCUMENTS[3], "max_length": 8, "num_beams": 2}
    r = client.post(url, json={"input": body}, headers=auth)
    assert r.status_code == 200, r.text
    runner = runners["tiny-bart"]
    [item] = runner.preprocess([runner.parse_input(body)])
    expected = runner.postprocess(item, runner.infer([item])[0])
    assert r.json()["output"] == expected.output
    assert r.json()["meta"]["tokens"] == expected.tokens
    for payload, field in BAD_INPUTS:
        bad = client.post(url, json={"input": payload}, headers=auth)
        assert bad.status_code == 422, (payload, bad.text)
        assert bad.json()["details"].get("field") == field
    batch = client.post(url, json={"input": {"text": ["a", "b"]}}, headers=auth)
    assert batch.status_code == 422 and batch.json()["code"] == "BATCH_NOT_SUPPORTED"
    details = client.get("/v1/models/tiny-bart", headers=auth).json()["data"]
    assert details["task"] == "summarisation"


def test_every_beam_is_charged(
    api: tuple[TestClient, dict[str, str]], runners: dict[str, Runner]
) -> None:
    """Issue #13: beams were never charged. Four beams bill four decoder rows: at least four
    times the summary's tokens over the input, more than one beam, at most the reservation."""
    client, auth = api
    runner = runners["tiny-bart"]
    [item] = runner.preprocess([runner.parse_input({"text": DOCUMENTS[1]})])
    used = {}
    for beams in (1, 4):
        body = {"text": DOCUMENTS[1], "model": "tiny-bart", "max_length": 10, "num_beams": beams}
        r = client.post(URL, json=body, headers={**auth, "Cache-Control": "no-store"})
        assert r.status_code == 200, r.text
        used[beams] = int(r.headers["x-tokens-used"])
    [four] = runner.preprocess(
        [runner.parse_input({"text": DOCUMENTS[1], "max_length": 10, "num_beams": 4})]
    )
    best = runner.infer([four])[0][0]
    assert 0 < len(best) <= 10 and 0 < used[1] - item.n_input <= 10
    # Unbilled beams (the old way) would be n_input + len(best).
    assert item.n_input + 4 * len(best) <= used[4] <= item.n_input + 4 * 10


def test_task_api_summarises_one_text_or_a_list_in_order(
    api: tuple[TestClient, dict[str, str]], runners: dict[str, Runner]
) -> None:
    client, auth = api
    common = {"model": "tiny-bart", "max_length": 10}
    texts = [DOCUMENTS[0], SAMPLE_TEXTS[1], DOCUMENTS[2]]
    singles = []
    for text in texts:
        r = client.post(URL, json={"text": text, **common}, headers=auth)
        assert r.status_code == 200, r.text
        assert r.headers["x-model"] == "tiny-bart" and r.headers["x-cache"] == "MISS"
        runner = runners["tiny-bart"]
        [item] = runner.preprocess([runner.parse_input({"text": text, "max_length": 10})])
        expected = runner.postprocess(item, runner.infer([item])[0])
        assert r.json() == {"output": expected.output["output"]}
        assert int(r.headers["x-tokens-used"]) == expected.tokens
        singles.append(r.json()["output"])
    # A list runs as one batch. INT8 activation scales are per batch, so a near-tie can go
    # either way: compare with the runner's batch of the same texts (no-store: no cache).
    runner = runners["tiny-bart"]
    items = runner.preprocess([runner.parse_input({"text": t, "max_length": 10}) for t in texts])
    batched = [
        runner.postprocess(i, raw).output["output"]
        for i, raw in zip(items, runner.infer(items), strict=True)
    ]
    headers = {**auth, "cache-control": "no-store"}
    r = client.post("/summarisation", json={"text": texts, **common}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"output": batched} and r.headers["x-cache"] == "BYPASS"
    # From the cache, item by item: the single answers, in order.
    r = client.post("/summarisation", json={"text": texts, **common}, headers=auth)
    assert r.json() == {"output": singles} and r.headers["x-cache"] == "HIT"
    again = client.post(URL, json={"text": texts[0], **common}, headers=auth)
    assert again.headers["x-cache"] == "HIT" and again.headers["x-tokens-used"] == "0"


def test_task_api_seed_example_uses_the_english_alias(
    api: tuple[TestClient, dict[str, str]],
) -> None:
    client, auth = api
    body = {"text": "Some long text to summarise", "model": "english"}
    r = client.post("/summarisation", json=body, headers=auth)
    assert r.status_code == 200, r.text
    assert r.headers["x-model"] == "tiny-t5"
    assert set(r.json()) == {"output"} and isinstance(r.json()["output"], str)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        *BAD_INPUTS[:3],
        *BAD_INPUTS[4:],
        ({"text": []}, "text"),
        ({"text": ["fine", ""]}, "text"),
        ({"text": "hi", "truncate": "no"}, "truncate"),
    ],
)
def test_task_api_bad_inputs_are_422_naming_the_field(
    api: tuple[TestClient, dict[str, str]], body: dict[str, Any], field: str
) -> None:
    client, auth = api
    r = client.post(URL, json={**body, "model": "tiny-t5"}, headers=auth)
    assert r.status_code == 422, r.text
    error = r.json()
    assert error["code"] == "VALIDATION_ERROR"
    assert f"`{field}`" in error["message"] or error["details"].get("field") == field


def test_task_api_refuses_a_model_of_another_task(
    api: tuple[TestClient, dict[str, str]],
    serve: Callable[..., TestClient],
    custom_models: tuple[Path, Path],
) -> None:
    client = serve(custom_models[1])
    key = client.keys.create("other", ["predict"])[1]  # type: ignore[attr-defined]
    r = client.post(URL, json={"text": "hi", "model": "my-model"}, headers={"x-api-key": key})
    assert r.status_code == 422 and r.json()["code"] == "MODEL_TASK_MISMATCH"


# ---- serving imports -------------------------------------------------------------------------


def test_serving_code_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'optimum'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import appliance.tasks.summarise, appliance.api.summarise\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_an_oversized_summarisation_is_refused_before_any_model_work(
    serve: Callable[..., TestClient], s2s_models: Path
) -> None:
    import time

    # The tiny models' inputs are short, so a small budget stands in for the default.
    client = serve(s2s_models, APPLIANCE_LIMITS__MAX_GENERATION_POSITIONS="100")
    auth = {"x-api-key": client.keys.create("big", ["predict"])[1]}  # type: ignore[attr-defined]
    url = "/v1/models/tiny-bart/predict"
    body = {"text": DOCUMENTS[3], "max_length": 40, "min_length": 0, "num_beams": 8}
    start = time.perf_counter()
    r = client.post(url, json={"input": body}, headers=auth)
    assert time.perf_counter() - start < 1.0
    assert r.status_code == 422, r.text
    details = r.json()["details"]
    assert {"text", "max_length", "num_beams"} <= set(details["fields"])
    assert details["positions"] > details["max_positions"] == 100
    small = {"text": "A short text.", "max_length": 4, "min_length": 0, "num_beams": 2}
    assert client.post(url, json={"input": small}, headers=auth).status_code == 200


def test_a_bart_whose_tokenizer_returns_token_type_ids_exports_and_serves(  # type: ignore[no-untyped-def]
    serve, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from exporters.export import export_model

    checkpoint = build_tiny_bart(tmp_path / "ckpt", token_type_ids=True)
    assert "token_type_ids" in AutoTokenizer.from_pretrained(checkpoint)("a text")
    models = tmp_path / "models"
    export_model(checkpoint, "summarisation", out_dir=models, slug="tt-bart")
    client = serve(models)
    headers = {"x-api-key": client.keys.create("k", ["predict"])[1]}
    r = client.post(
        "/v1/models/tt-bart/predict", json={"input": {"text": DOCUMENTS[0]}}, headers=headers
    )
    assert r.status_code == 200, r.text
    assert r.json()["output"]["output"].strip()
