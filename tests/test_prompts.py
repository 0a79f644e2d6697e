"""EncodedPrompts: each kind of prompt encoded once, a batch assembled from the kinds of its samples, and the CLIP part
computed per batch where CLIP trains."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_flux_pipeline

from peft_sara.script_utils.prompts import EncodedPrompts, t5_hidden_states


def count_calls(encode):
    calls = []

    def counted(encoders, ids):
        calls.append(len(ids[0]))
        return encode(encoders, ids)

    return counted, calls


def pooled(encoders, ids):
    return (encoders[0](ids[0]).pooler_output,)


def test_each_prompt_is_encoded_once_and_batches_follow_their_kinds():
    pipeline = tiny_flux_pipeline()
    encode, calls = count_calls(pooled)
    prompts = {"instance": "a sks dog", "class": "a dog", "validation": None}
    encoded = EncodedPrompts(
        prompts, pipeline.tokenizer_2, pipeline.text_encoder_2, 8, [pipeline.tokenizer], [pipeline.text_encoder],
        encode, clip_trains=False,
    )  # fmt: skip
    assert calls == [1, 1] and sorted(encoded.t5) == ["class", "instance"], "None prompts are skipped"
    torch.testing.assert_close(
        encoded.t5["class"], t5_hidden_states(pipeline.tokenizer_2, pipeline.text_encoder_2, "a dog", 8)
    )
    t5, (clip,) = encoded.batch(["class", "instance", "class"], [None], [None])
    assert calls == [1, 1], "nothing is encoded again"
    torch.testing.assert_close(t5[0], t5[2])
    torch.testing.assert_close(t5[1], encoded.t5["instance"][0])
    torch.testing.assert_close(clip[1], encoded.clip["instance"][0][0])


def test_where_clip_trains_its_part_is_computed_from_the_batch_with_gradients():
    pipeline = tiny_flux_pipeline()
    encode, calls = count_calls(pooled)
    encoded = EncodedPrompts(
        {"instance": "a sks dog"}, pipeline.tokenizer_2, pipeline.text_encoder_2, 8, [pipeline.tokenizer],
        [pipeline.text_encoder], encode, clip_trains=True,
    )  # fmt: skip
    assert calls == [] and encoded.clip == {}
    ids = encoded.clip_ids("a sks dog")[0].repeat(2, 1)
    _, (clip,) = encoded.batch(["instance", "instance"], [pipeline.text_encoder], [ids])
    assert calls == [2] and clip.requires_grad, "the trained encoder's graph reaches the loss"
    _, (validation,) = encoded.of("instance", [pipeline.text_encoder])
    assert not validation.requires_grad, "validation encodes without gradients"


def test_where_t5_trains_its_states_are_computed_per_batch_with_gradients_and_match_the_pipeline_s():
    pipeline = tiny_flux_pipeline()
    t5 = pipeline.text_encoder_2
    t5.get_input_embeddings().weight.requires_grad_(True)
    encoded = EncodedPrompts(
        {"instance": "a sks dog", "class": "a dog"}, pipeline.tokenizer_2, t5, 8, [pipeline.tokenizer],
        [pipeline.text_encoder], pooled, clip_trains=False, t5_trains=True,
    )  # fmt: skip
    assert encoded.t5 == {}, "nothing of T5 is cached while it trains"
    states, _ = encoded.batch(["class", "instance"], [None], [None], t5)
    assert states.requires_grad, "the trained T5's graph reaches the loss"
    with torch.no_grad():
        for row, prompt in enumerate(("a dog", "a sks dog")):
            torch.testing.assert_close(states[row : row + 1], t5_hidden_states(pipeline.tokenizer_2, t5, prompt, 8))
    validation, _ = encoded.of("instance", [None], t5)
    assert not validation.requires_grad, "validation encodes without gradients"
    with pytest.raises(ValueError, match="T5 trains in this run"):
        encoded.batch(["instance"], [None], [None])
