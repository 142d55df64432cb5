"""Tests for eddpm/prompts.py: IC-Light's long-prompt recipe (docs/iclight-facts.md, "Long prompts").

Token ids are built by hand from the tiny tokenizer's BOS, EOS and the single token of "a"; embeddings are
compared with direct text-encoder calls on those ids.
"""

import torch

from eddpm.prompts import encode_prompt_pair, encode_prompts, prompt_token_chunks


def hand_chunk(bos: int, eos: int, tokens: list[int]) -> list[int]:
    """BOS + up to 75 tokens + EOS, padded with EOS to 77."""
    assert len(tokens) <= 75
    return [bos, *tokens, eos] + [eos] * (75 - len(tokens))


def test_prompt_chunks_follow_iclight_long_prompt_recipe(tiny_components):
    tok = tiny_components.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    a = tok("a", add_special_tokens=False).input_ids
    assert len(a) == 1, "the tiny tokenizer encodes 'a' as one token"
    chunks = prompt_token_chunks(tok, "a " * 100)  # 100 tokens -> 75 + 25
    assert len(chunks) == 2 and all(len(c) == 77 for c in chunks)
    assert chunks[0] == [bos] + a * 75 + [eos]
    assert chunks[1] == [bos] + a * 25 + [eos] * 51
    assert prompt_token_chunks(tok, "") == [[bos] + [eos] * 76], "an empty prompt is one empty chunk"
    # The short case equals the usual diffusers tokenisation (pad token = EOS for CLIP).
    usual = tok("a photo", padding="max_length", max_length=77, truncation=True).input_ids
    assert prompt_token_chunks(tok, "a photo") == [usual]
    assert prompt_token_chunks(tok, "a " * 100, max_chunks=1) == chunks[:1]


def test_encode_prompts_is_one_truncated_chunk_per_prompt(tiny_components):
    tok, te = tiny_components.tokenizer, tiny_components.text_encoder
    bos, eos = tok.bos_token_id, tok.eos_token_id
    (a,) = tok("a", add_special_tokens=False).input_ids
    ids = torch.tensor([hand_chunk(bos, eos, [a] * 75), hand_chunk(bos, eos, [])])  # [2, 77]
    with torch.no_grad():
        got = encode_prompts(tok, te, ["a " * 100, ""])
        want = te(ids).last_hidden_state  # [2, 77, 32]
    assert got.shape == (2, 77, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_encode_prompt_pair_chunks_and_repeats_the_shorter_list(tiny_components):
    tok, te = tiny_components.tokenizer, tiny_components.text_encoder
    bos, eos = tok.bos_token_id, tok.eos_token_id
    (a,) = tok("a", add_special_tokens=False).input_ids
    bad = tok("bad", add_special_tokens=False).input_ids
    long_1, long_2 = hand_chunk(bos, eos, [a] * 75), hand_chunk(bos, eos, [a] * 25)
    bad_chunk, empty_chunk = hand_chunk(bos, eos, bad), hand_chunk(bos, eos, [])

    def embed(chunks):  # each chunk encoded alone, concatenated along the sequence: [1, 77 n, 32]
        with torch.no_grad():
            return te(torch.tensor(chunks)).last_hidden_state.reshape(1, -1, 32)

    with torch.no_grad():
        cond, uncond = encode_prompt_pair(tok, te, "a " * 100, "bad")
        empty_cond, empty_uncond = encode_prompt_pair(tok, te, "", "")
        short_cond, long_uncond = encode_prompt_pair(tok, te, "", "a " * 100)

    assert cond.shape == uncond.shape == (1, 154, 32)
    torch.testing.assert_close(cond, embed([long_1, long_2]), rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond, embed([bad_chunk, bad_chunk]), rtol=0, atol=1e-6)  # repeated
    assert empty_cond.shape == empty_uncond.shape == (1, 77, 32)
    torch.testing.assert_close(empty_cond, embed([empty_chunk]), rtol=0, atol=1e-6)
    torch.testing.assert_close(empty_uncond, embed([empty_chunk]), rtol=0, atol=1e-6)
    torch.testing.assert_close(short_cond, embed([empty_chunk, empty_chunk]), rtol=0, atol=1e-6)
    torch.testing.assert_close(long_uncond, embed([long_1, long_2]), rtol=0, atol=1e-6)
