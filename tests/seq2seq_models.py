"""Tiny seq2seq checkpoints for the summarisation tests: T5 and BART made from a config with
random weights, and tokenizers trained offline on a few texts (a Unigram one like T5's, a
ByteLevel BPE one like BART's)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporters.samples import SAMPLE_TEXTS
from tests.generation_models import EXTRA_TEXTS

DOCUMENTS = [
    "The city council approved a new budget on Monday. It raises spending on schools and "
    "roads, and cuts the cost of public transport for students and pensioners.",
    "Heavy rain caused flooding in the north of the country. Several villages were "
    "evacuated, trains were cancelled and the army helped to build barriers.",
    "The company reported record profits for the third quarter, driven by strong sales of "
    "its new phone in Asia and Europe. Its shares rose by ten percent.",
    "Scientists have found a new species of frog in the rainforest. It is smaller than a "
    "coin and sings at night to attract a mate.",
    "summarize: the meeting was moved to tomorrow because the report was not ready.",
]
"""Texts for the tokenizers' vocabulary and for the tests' inputs."""

T5_TASK_PARAMS = {
    "summarization": {
        "early_stopping": False,
        "length_penalty": 1.5,
        "max_length": 14,
        "min_length": 4,
        "no_repeat_ngram_size": 3,
        "num_beams": 3,
        "prefix": "summarize: ",
    }
}
"""Like t5-small's config.json (which says early_stopping true: beam search here always
runs as transformers' early_stopping=False)."""


def _corpus() -> list[str]:
    return list(SAMPLE_TEXTS) + EXTRA_TEXTS + DOCUMENTS


def build_unigram_tokenizer(folder: Path) -> int:
    """A T5-style tokenizer: a SentencePiece-like Unigram model with Metaspace, </s> after the
    text, ids <pad>=0, </s>=1, <unk>=2. Its pieces are the corpus's words and characters with
    fixed scores (the Unigram trainer is not deterministic). Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in _corpus() for w in text.split()})
    chars = sorted({c for text in _corpus() for c in text if not c.isspace()})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + w, -2.0) for w in words]
    pieces += [(c, -5.0) for c in chars] + [("\u2581" + c, -4.0) for c in chars]
    vocab = list({p: s for p, s in pieces}.items())
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=64,
    )
    fast.save_pretrained(folder)
    return int(tok.get_vocab_size())


def build_bart_tokenizer(
    folder: Path, vocab_size: int = 400, *, token_type_ids: bool = False
) -> int:
    """A BART-style ByteLevel BPE tokenizer: <s> text </s>, ids <s>=0, <pad>=1, </s>=2. With
    token_type_ids it is PreTrainedTokenizerFast's default, which also returns token_type_ids
    (that BART's forward does not take)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(
        sep=("</s>", 2), cls=("<s>", 0), trim_offsets=False, add_prefix_space=False
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        **({} if token_type_ids else {"model_input_names": ["input_ids", "attention_mask"]}),
        model_max_length=96,
    )
    fast.save_pretrained(folder)
    return int(tok.get_vocab_size())


@dataclass(frozen=True)
class Decisive:
    """Random weights score the next tokens nearly alike, and INT8 rounding would flip greedy
    choices no trained model would hesitate over. So: the output head gets a bigram
    preference on top of its random part (each token favours one successor, as in
    tests.generation_models) and `enders` tokens favour EOS, so that summaries end before
    max_length as real ones do; the decoder's own layers are damped (`inner`) so the current
    token shows through to the head; cross-attention is scaled by `cross` so that the text
    still moves the summary."""

    bigram: float = 4.0
    inner: float = 0.1
    cross: float = 1.0
    enders: int = 12


T5_DECISIVE = Decisive()
BART_DECISIVE = Decisive(inner=0.3, cross=10.0)
"""Post-norm BART needs a stronger cross-attention for the text to show."""


def _decisive(model: Any, seed: int, eos: int, tuning: Decisive) -> None:
    import torch

    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    generator = torch.Generator().manual_seed(seed)
    vocab = head.weight.shape[0]
    successor = torch.randperm(vocab, generator=generator)
    enders = torch.randperm(vocab, generator=generator)[: tuning.enders]
    with torch.no_grad():
        scale = embed.weight.std()
        weight = head.weight / head.weight.std() + tuning.bigram * embed.weight[successor] / scale
        weight[eos] += tuning.bigram * embed.weight[enders].sum(0) / scale
        head.weight.copy_(weight)


def build_tiny_t5(folder: Path, seed: int = 0, tuning: Decisive = T5_DECISIVE) -> Path:
    """A 2+2-layer T5 (d_model 32) with a T5-style tokenizer and t5-small-like task params."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    vocab = build_unigram_tokenizer(folder)
    config = T5Config(
        vocab_size=vocab,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
        task_specific_params=T5_TASK_PARAMS,
    )
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for block in model.decoder.block:
            block.layer[0].SelfAttention.o.weight.mul_(tuning.inner)
            block.layer[1].EncDecAttention.o.weight.mul_(tuning.cross)
            block.layer[2].DenseReluDense.wo.weight.mul_(tuning.inner)
    _decisive(model, seed, 1, tuning)
    model.save_pretrained(folder)
    return folder


def build_tiny_bart(
    folder: Path,
    seed: int = 0,
    tuning: Decisive = BART_DECISIVE,
    *,
    token_type_ids: bool = False,
) -> Path:
    """A 2+2-layer BART (d_model 32) with a BART-style tokenizer; like bart-large-cnn it
    forces <s> first and </s> at max_length."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    vocab = build_bart_tokenizer(folder, token_type_ids=token_type_ids)
    config = BartConfig(
        vocab_size=vocab,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_bos_token_id=0,
        forced_eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(config).eval()
    with torch.no_grad():
        # Untied: each holds its own copy (tied ones are saved once and re-made on load).
        for part in (model.model.encoder, model.model.decoder):
            part.embed_tokens.weight = torch.nn.Parameter(model.model.shared.weight.clone())
        for layer in model.model.decoder.layers:
            layer.self_attn.out_proj.weight.mul_(tuning.inner)
            layer.fc2.weight.mul_(tuning.inner)
            layer.encoder_attn.v_proj.weight.mul_(tuning.cross)
            layer.encoder_attn.out_proj.weight.mul_(tuning.cross)
    _decisive(model, seed, 2, tuning)
    model.save_pretrained(folder)
    return folder
