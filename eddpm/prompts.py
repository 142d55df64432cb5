"""Prompts to CLIP embeddings: IC-Light's long-prompt recipe for the demo, one truncated chunk for training.

docs/iclight-facts.md, "Long prompts": tokenised without truncation, split into 75-token chunks, each
wrapped as BOS + chunk + EOS and padded with EOS to 77; positive and negative chunk lists are repeated
cyclically to the same count and concatenated along the sequence axis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTokenizer


def prompt_token_chunks(
    tokenizer: CLIPTokenizer, prompt: str, max_chunks: int | None = None
) -> list[list[int]]:
    """Token ids in 77-long chunks: BOS + up to 75 tokens + EOS, padded with EOS.

    Tokenised without truncation; an empty prompt gives one chunk of the empty string.
    `max_chunks=1` is the truncated single-chunk form used for training batches.
    """
    width = tokenizer.model_max_length - 2  # 75 tokens between BOS and EOS
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = tokenizer(prompt, truncation=False, add_special_tokens=False, verbose=False).input_ids
    pieces = [ids[i : i + width] for i in range(0, len(ids), width)] or [[]]
    if max_chunks is not None:
        pieces = pieces[:max_chunks]
    return [[bos, *piece, eos] + [eos] * (width - len(piece)) for piece in pieces]


def _encode_chunks(text_encoder: CLIPTextModel, chunks: list[list[int]]) -> torch.Tensor:
    ids = torch.tensor(chunks, dtype=torch.long, device=text_encoder.device)  # [N, 77]
    return text_encoder(ids).last_hidden_state  # [N, 77, D]


def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """Single-chunk text embeddings for a training batch (truncated to 75 tokens): [B, 77, D]."""
    chunks = [prompt_token_chunks(tokenizer, p, max_chunks=1)[0] for p in prompts]
    return _encode_chunks(text_encoder, chunks)


def encode_prompt_pair(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompt: str, negative_prompt: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """IC-Light's long-prompt embeddings (cond, uncond), each [1, 77 * n, D].

    Both prompts are split into 75-token chunks; the shorter chunk list is repeated cyclically to
    n = max(count) chunks; each chunk is encoded alone and the results are concatenated along the
    sequence axis.
    """
    pos = prompt_token_chunks(tokenizer, prompt)
    neg = prompt_token_chunks(tokenizer, negative_prompt)
    n = max(len(pos), len(neg))
    pos = [pos[i % len(pos)] for i in range(n)]
    neg = [neg[i % len(neg)] for i in range(n)]
    hidden = _encode_chunks(text_encoder, pos + neg)  # [2n, 77, D]
    cond = hidden[:n].reshape(1, -1, hidden.shape[-1])  # [1, 77n, D]
    uncond = hidden[n:].reshape(1, -1, hidden.shape[-1])  # [1, 77n, D]
    return cond, uncond
