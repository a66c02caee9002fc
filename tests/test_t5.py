"""Tokenization and encoding exactly as the official text embedder: 224 ids, no attention mask."""

from __future__ import annotations

import torch

from k4serve.models.t5 import MAX_TOKENS, T5TextEncoder


def test_tokenization_gives_224_ids_with_eos_then_padding():
    encoder = T5TextEncoder.from_preset("tiny")
    ids = encoder.tokenize("a red fox")[0]
    assert ids.shape == (MAX_TOKENS,) == (224,)
    text_ids = [b + 3 for b in b"a red fox"]  # ByT5: byte + 3 special ids
    assert ids[: len(text_ids)].tolist() == text_ids
    assert ids[len(text_ids)] == encoder.tokenizer.eos_token_id == 1
    assert (ids[len(text_ids) + 1 :] == encoder.tokenizer.pad_token_id).all()


def test_long_prompt_is_truncated_to_224_ending_in_eos():
    ids = T5TextEncoder.from_preset("tiny").tokenize("x" * 1000)[0]
    assert ids.shape == (224,) and ids[-1] == 1 and (ids[:-1] == ord("x") + 3).all()


def test_encoder_is_called_without_attention_mask():
    encoder = T5TextEncoder.from_preset("tiny")
    out = encoder("a red fox")
    ids = encoder.tokenize("a red fox")
    unmasked = encoder.encoder(input_ids=ids).last_hidden_state[0]
    masked = encoder.encoder(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state[0]
    assert out.shape == (224, encoder.dim)
    torch.testing.assert_close(out, unmasked, rtol=0, atol=0)
    assert not torch.allclose(out[:5], masked[:5], atol=1e-4)  # pads are attended: the mask would change it


def test_tiny_preset_is_deterministic():
    a, b = T5TextEncoder.from_preset("tiny"), T5TextEncoder.from_preset("tiny")
    torch.testing.assert_close(a("same prompt"), b("same prompt"), rtol=0, atol=0)
