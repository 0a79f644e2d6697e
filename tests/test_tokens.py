"""peft_sara.tokens: which text encoder each key of a token-embeddings file goes to, the file's checks, and adding
new tokens exactly and undoably."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_flux_pipeline, tiny_pipeline, tiny_sd3_pipeline
from safetensors.torch import save_file

from peft_sara.tokens import add_new_tokens, read_token_embeddings, token_embedding_targets


def test_each_key_goes_to_the_text_encoder_of_its_kind_in_every_family():
    assert token_embedding_targets(tiny_pipeline()) == {"clip_l": ("text_encoder", "tokenizer")}
    assert token_embedding_targets(tiny_flux_pipeline()) == {
        "clip_l": ("text_encoder", "tokenizer"),
        "t5": ("text_encoder_2", "tokenizer_2"),
    }
    assert token_embedding_targets(tiny_sd3_pipeline()) == {
        "clip_l": ("text_encoder", "tokenizer"),
        "clip_g": ("text_encoder_2", "tokenizer_2"),
        "t5": ("text_encoder_3", "tokenizer_3"),
    }
    without_t5 = tiny_sd3_pipeline()
    without_t5.text_encoder_3 = None  # SD3 loaded with text_encoder_3=None, as its docs suggest for low memory
    assert "t5" not in token_embedding_targets(without_t5)


def test_a_file_with_t5_rows_reads_and_one_with_an_unknown_key_is_refused(tmp_path):
    good = tmp_path / "good_emb.safetensors"
    save_file({"clip_l": torch.randn(2, 32), "t5": torch.randn(2, 16)}, str(good))
    tensors, tokens, _ = read_token_embeddings(str(good))
    assert sorted(tensors) == ["clip_l", "t5"] and tokens == ["<s0>", "<s1>"]
    bad = tmp_path / "bad_emb.safetensors"
    save_file({"clip_l": torch.randn(2, 32), "t5_xxl": torch.randn(2, 16)}, str(bad))
    with pytest.raises(ValueError, match=r"expected \['clip_l', 'clip_g', 't5'\]"):
        read_token_embeddings(str(bad))


def test_new_t5_tokens_take_rows_and_undo_puts_the_tokenizer_and_encoder_back():
    pipeline = tiny_flux_pipeline()
    tokenizer, t5 = pipeline.tokenizer_2, pipeline.text_encoder_2
    before = t5.get_input_embeddings().weight.detach().clone()
    vocabulary = dict(tokenizer.get_vocab())
    rows = torch.randn(2, before.shape[1])
    undo = add_new_tokens(tokenizer, t5, ["<s0>", "<s1>"], rows)
    ids = tokenizer.convert_tokens_to_ids(["<s0>", "<s1>"])
    assert tokenizer.convert_ids_to_tokens(tokenizer("a <s0><s1> dog").input_ids)[3:5] == ["<s0>", "<s1>"]
    weight = t5.get_input_embeddings().weight
    assert torch.equal(weight[ids], rows.to(weight.dtype))
    others = [row for row in range(len(before)) if row not in ids]
    assert torch.equal(weight[others], before[others]), "every other row stays as it was"
    undo()
    assert tokenizer.get_vocab() == vocabulary and torch.equal(t5.get_input_embeddings().weight, before)
