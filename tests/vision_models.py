"""Tiny vision checkpoints built offline with random weights: a CLIP (byte-level BPE tokenizer,
CLIPImageProcessor) and a ViT classifier (ViTImageProcessor, id2label)."""

from __future__ import annotations

import math
from pathlib import Path

from exporters.samples import SAMPLE_TEXTS
from exporters.vision import SAMPLE_LABELS

CLIP_WORDS = ["a photo of a", "red", "blue", "green", "square", "circle", "cat", "dog"]
VIT_LABELS = ["cat", "dog", "bird"]


def build_bpe_tokenizer(folder: Path, max_length: int = 32) -> tuple[int, int]:
    """A CLIP-like byte-level BPE (lowercased, <|startoftext|> ... <|endoftext|>), trained on
    the sample texts and labels; returns (bos, eos) ids."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=400,
        special_tokens=[bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([*SAMPLE_TEXTS, *SAMPLE_LABELS, *CLIP_WORDS], trainer)
    bos_id, eos_id = tok.token_to_id(bos), tok.token_to_id(eos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, bos_id), (eos, eos_id)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos,  # as openai/clip-*: padding repeats <|endoftext|>
        unk_token=eos,
        model_max_length=max_length,
        model_input_names=["input_ids", "attention_mask"],
    ).save_pretrained(folder)
    return bos_id, eos_id


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """CLIP with 2-layer towers of width 32, 32x32 images in 8x8 patches, 16-d embeddings."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    bos, eos = build_bpe_tokenizer(folder)
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(folder))
    tower = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": 16,
    }
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": vocab_size,
            "max_position_embeddings": 32,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "pad_token_id": eos,
        },
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
        # A trained CLIP's scale (100): random embeddings then give decided zero-shot answers.
        logit_scale_init_value=math.log(100.0),
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(folder)
    return folder


def build_tiny_vit(folder: Path, seed: int = 1) -> Path:
    """A 2-layer ViT classifier over VIT_LABELS, 32x32 images in 8x8 patches."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder.mkdir(parents=True, exist_ok=True)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        id2label=dict(enumerate(VIT_LABELS)),
        label2id={label: i for i, label in enumerate(VIT_LABELS)},
    )
    torch.manual_seed(seed)
    model = ViTForImageClassification(config).eval()
    # Random heads give near-uniform scores; widen them so labels are decided, not ties.
    with torch.no_grad():
        model.classifier.weight.mul_(30.0)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
