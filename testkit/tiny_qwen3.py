"""The tiny Qwen3 text encoder and byte-level BPE tokenizer that the tiny Z-Image and FLUX.2 Klein models
share (testkit/tiny_zimage.py, testkit/tiny_klein.py).

The tokenizer is built in code with the `tokenizers` library: GPT-2's byte-level pre-tokenizer and
decoder over the 256 byte symbols (no merges: every byte is one token, which is still a byte-level BPE,
just an untrained one), plus Qwen3's special tokens and a chat template that writes what Qwen3's does
for one user turn (``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n``, followed by an
empty ``<think>`` block when ``enable_thinking`` is false, as Qwen3's own template does). It is saved
as a ``Qwen2TokenizerFast`` folder, the class both pipelines declare.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Qwen3's special tokens in the order Qwen3's tokenizer numbers them after its ordinary vocabulary
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def build_tokenizer():
    """A ``Qwen2TokenizerFast`` over a byte-level BPE of the 256 byte symbols plus SPECIAL_TOKENS
    (vocabulary 261; pad = eos = ``<|endoftext|>``, as Qwen3's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(tokenizer_object=core, unk_token=None, bos_token=None,
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 131072
    return tokenizer


def qwen3_config(hidden_size: int, num_hidden_layers: int, vocab_size: int) -> dict:
    """A small Qwen3 config: `hidden_size` split into 2 query heads of hidden_size // 2 and one KV head
    (grouped-query attention as the real 4B/8B models, 32 query and 8 KV heads), SwiGLU width 2x."""
    return dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_hidden_layers, num_attention_heads=2, num_key_value_heads=1,
                head_dim=hidden_size // 2, max_position_embeddings=1024, rope_theta=1000000.0,
                tie_word_embeddings=True, rms_norm_eps=1e-6)


def build_text_encoder(config: dict, causal_lm: bool, seed: int):
    """A Qwen3Model (Z-Image's text encoder) or Qwen3ForCausalLM (Klein's) with `config`, seeded."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    torch.manual_seed(seed)
    cls = Qwen3ForCausalLM if causal_lm else Qwen3Model
    return cls(Qwen3Config(**config)).eval()


def qwen3_to_comfy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Qwen3 state dict in the layout of ComfyUI's text-encoder files (``qwen_3_4b.safetensors``):
    transformers' Qwen3ForCausalLM names, ``model.layers.N...``, ``model.embed_tokens``, ``model.norm``;
    a bare Qwen3Model's keys gain the ``model.`` prefix; the tied ``lm_head`` is left out."""
    out = {}
    for key, value in state.items():
        if key.startswith("lm_head."):
            continue
        out[key if key.startswith("model.") else "model." + key] = value.contiguous()
    return out


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer as a Qwen2 tokenizer folder (tokenizer.json, tokenizer_config.json with the chat template)."""
    tokenizer.save_pretrained(str(folder))
