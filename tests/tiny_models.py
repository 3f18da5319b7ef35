"""Tiny models built from configs (nothing is downloaded), saved to disk for loading tests."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from hf_qad.nvfp4.conversion import DEFAULT_MODULES_TO_NOT_CONVERT

VOCAB = 128


def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def save_tiny_llama(path: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16, **overrides) -> Path:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype)
    model.save_pretrained(path)
    return path


def token_batches(n: int = 2, batch: int = 2, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}: "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}</s>{% endgeneration %}"
    "{% else %}{{ message['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_tokenizer(add_bos: bool = False):
    """A character-level tokenizer (printable ASCII) built with the tokenizers library.

    ``add_bos``: encoding starts every row with ``<s>``, as Gemma's and Llama-3's tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {token: i for i, token in enumerate(specials + [chr(c) for c in range(32, 127)])}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.BPEDecoder()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_llama_with_tokenizer(path: Path, seed: int = 0, add_bos: bool = False, **overrides) -> Path:
    tokenizer = tiny_tokenizer(add_bos=add_bos)
    save_tiny_llama(path, seed=seed, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, **overrides)
    tokenizer.save_pretrained(path)
    return path


# The architectures users fine-tune, each as a tiny config keeping what sets it apart. Every layer's
# in_features is a multiple of 16 (NVFP4's block), so every Linear but the head is converted.
_SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)


class TinyArchitecture(NamedTuple):
    config_class: type[PretrainedConfig]
    settings: dict  # beyond _SHAPE
    adds_bos: bool  # whether the real models' tokenizers start every row with BOS


ARCHITECTURES: dict[str, TinyArchitecture] = {
    "llama": TinyArchitecture(LlamaConfig, dict(tie_word_embeddings=False), False),
    # Llama-3.2-1B/3B: the head tied to the embedding, BOS
    "llama_tied": TinyArchitecture(LlamaConfig, dict(tie_word_embeddings=True), True),
    "qwen2": TinyArchitecture(Qwen2Config, dict(tie_word_embeddings=False), False),
    "mistral": TinyArchitecture(MistralConfig, dict(tie_word_embeddings=False, sliding_window=8), True),
    # q/k RMSNorms
    "qwen3": TinyArchitecture(Qwen3Config, dict(tie_word_embeddings=False, head_dim=16), False),
    # fused qkv_proj and gate_up_proj Linears
    "phi3": TinyArchitecture(Phi3Config, dict(tie_word_embeddings=False, sliding_window=8), False),
    # Gemma-3 text: a scaled embedding tied to the head (262k rows in the real models), q/k norms,
    # sliding-window layers interleaved with global ones (5:1 in the real models), BOS
    "gemma3": TinyArchitecture(
        Gemma3TextConfig,
        dict(tie_word_embeddings=True, head_dim=16, sliding_window=8,
             layer_types=["sliding_attention", "full_attention"]),
        True,
    ),
}


# Mixture-of-experts architectures (transformers 5 fuses their experts into 3-D parameters), tiny:
# 4 experts, top-2, routers kept in high precision.
MOE_ARCHITECTURES: dict[str, TinyArchitecture] = {
    "qwen3_moe": TinyArchitecture(
        Qwen3MoeConfig, dict(tie_word_embeddings=False, head_dim=16, num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=32), False),
    "mixtral": TinyArchitecture(MixtralConfig, dict(tie_word_embeddings=False, num_local_experts=4), True),
    # a shared expert (nn.Linear MLP) with a sigmoid gate next to the routed experts
    "qwen2_moe": TinyArchitecture(
        Qwen2MoeConfig, dict(tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=32, shared_expert_intermediate_size=64), False),
}


def tiny_config(architecture: str, **overrides) -> PretrainedConfig:
    """A tiny config of one of :data:`ARCHITECTURES` (or :data:`MOE_ARCHITECTURES`), special tokens matching
    :func:`tiny_tokenizer`."""
    config_cls, settings, _ = {**ARCHITECTURES, **MOE_ARCHITECTURES}[architecture]
    tokenizer = tiny_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    return config_cls(**{**_SHAPE, **settings, **ids, **overrides})


def save_tiny_model(path: Path, architecture: str, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                    **overrides) -> Path:
    """Save a tiny model of one of :data:`ARCHITECTURES` with its tokenizer (BOS as the architecture's)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(architecture, **overrides)).to(dtype)
    model.save_pretrained(path)
    tiny_tokenizer(add_bos={**ARCHITECTURES, **MOE_ARCHITECTURES}[architecture].adds_bos).save_pretrained(path)
    return path


KEEP_EXPERTS = [*DEFAULT_MODULES_TO_NOT_CONVERT, r".*mlp\.experts"]
"""``modules_to_not_convert`` keeping the fused experts (and, as by default, routers and head) in high precision."""


TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine",
    "all that glitters is not gold",
    "the early bird catches the worm",
    "actions speak louder than words",
    "practice makes perfect every day",
    "knowledge is power and time is money",
    "better late than never they say",
]
