"""Tiny decoder-only checkpoints for the generation tests: GPT-2 and Llama made from a config
with random weights, and a ByteLevel BPE tokenizer trained offline on the sample texts."""

from __future__ import annotations

from pathlib import Path

from exporters.samples import SAMPLE_TEXTS

EXTRA_TEXTS = [
    "Once upon a time there was a little robot who liked to read books.",
    "The weather today is sunny with a light breeze from the sea.",
    "Geralt knew the signs, the monster was a vampire.",
    "Héllo wörld: ünïcode tëxt, naïve café, 東京 and emoji 🙂 should round-trip.",
]


def build_bpe_tokenizer(
    folder: Path, *, specials: list[str], bos: str | None, eos: str, vocab_size: int = 400
) -> int:
    """Train a ByteLevel BPE tokenizer, save it as a transformers folder; returns its size.
    With `bos`, every encoded text starts with it (as Llama tokenizers do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(SAMPLE_TEXTS) + EXTRA_TEXTS, trainer=trainer)
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos or eos,
        eos_token=eos,
        unk_token=eos,
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=128,
    )
    fast.save_pretrained(folder)
    return int(tok.get_vocab_size())


SHARPEN = 1.0
GPT2_BIGRAM = 2.0
GPT2_POSITIONS = 0.2
LLAMA_BIGRAM = 2.0


def _decisive(model: object, seed: int, bigram: float) -> None:
    """Random weights score the next tokens nearly alike: any rounding (INT8) flips a greedy
    choice, as no trained model's would. Give the output head a bigram preference (each token
    favours one successor) on top of its random part, and sharpen it: choices become clear
    while the layers (and so the context and the cache) still move them. SHARPEN scales the
    logits: 1 leaves sampling a real choice among a few tokens."""
    import torch

    head = model.get_output_embeddings()  # type: ignore[attr-defined]
    embed = model.get_input_embeddings()  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(seed)
    successor = torch.randperm(head.weight.shape[0], generator=generator)
    with torch.no_grad():
        rows = embed.weight[successor] / embed.weight.std()
        head.weight.copy_((head.weight / head.weight.std() + bigram * rows) * SHARPEN)


def build_tiny_gpt2(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = build_bpe_tokenizer(folder, specials=["<|endoftext|>"], bos=None, eos="<|endoftext|>")
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # learned positions as strong as the tokens would blur the bigrams
        model.transformer.wpe.weight.mul_(GPT2_POSITIONS)
    _decisive(model, seed, bigram=GPT2_BIGRAM)
    model.save_pretrained(folder)
    return folder


def build_tiny_llama(folder: Path, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = build_bpe_tokenizer(folder, specials=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>")
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    _decisive(model, seed, bigram=LLAMA_BIGRAM)
    model.save_pretrained(folder)
    return folder
