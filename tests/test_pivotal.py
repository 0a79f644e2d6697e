"""Pivotal tuning's new tokens: names, prompt rewriting, training only their rows, stopping, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_clip_text_model, tiny_pipeline

from peft_sara.script_utils.cli import UserInputError
from peft_sara.script_utils.pivotal import (
    NewTokenEmbeddings,
    check_pivotal_prompts,
    insert_new_tokens,
    new_tokens_by_abstraction,
)


def test_each_abstraction_gets_its_own_numbered_tokens_and_prompts_are_rewritten():
    new_tokens = new_tokens_by_abstraction("TOK, TOK2", 2)
    assert new_tokens == {"TOK": ["<s0>", "<s1>"], "TOK2": ["<s2>", "<s3>"]}
    assert insert_new_tokens("TOK2 next to a TOK dog", new_tokens) == "<s2><s3> next to a <s0><s1> dog"
    assert insert_new_tokens(None, new_tokens) is None
    assert new_tokens_by_abstraction("TOK", 3) == {"TOK": ["<s0>", "<s1>", "<s2>"]}
    for bad in ("TOK,,X", "TOK,TOK", " "):
        with pytest.raises(UserInputError, match="--token_abstraction"):
            new_tokens_by_abstraction(bad, 2)
    with pytest.raises(UserInputError, match="--num_new_tokens_per_abstraction must be at least 1"):
        new_tokens_by_abstraction("TOK", 0)


def test_prompts_that_would_not_train_or_show_the_tokens_are_refused():
    new_tokens = new_tokens_by_abstraction("TOK,STYLE", 1)
    check_pivotal_prompts(new_tokens, "a TOK dog, STYLE", "TOK in a bucket")
    with pytest.raises(UserInputError, match="--instance_prompt 'a TOK dog' does not contain .* 'STYLE'"):
        check_pivotal_prompts(new_tokens, "a TOK dog", None)
    with pytest.raises(UserInputError, match="--validation_prompt 'a dog' contains no token abstraction"):
        check_pivotal_prompts(new_tokens, "a TOK dog, STYLE", "a dog")
    with pytest.raises(UserInputError, match="--validation_prompt 'TOKYO at night' contains no token abstraction"):
        check_pivotal_prompts(new_tokens, "a TOK dog, STYLE", "TOKYO at night")
    with pytest.raises(UserInputError, match="--instance_prompt 'a TOK dog, STYLEs' does not contain .* 'STYLE'"):
        check_pivotal_prompts(new_tokens, "a TOK dog, STYLEs", None)


def test_an_abstraction_in_the_class_prompt_is_refused():
    """With prior preservation the class images would train the new tokens: instance training in disguise."""
    new_tokens = new_tokens_by_abstraction("dog", 1)
    check_pivotal_prompts(new_tokens, "a photo of dog", None, class_prompt="a photo of a puppy, doggy style")
    with pytest.raises(UserInputError, match="--class_prompt 'a photo of a dog' contains the token abstraction 'dog'"):
        check_pivotal_prompts(new_tokens, "a photo of dog", None, class_prompt="a photo of a dog")


def test_abstractions_are_replaced_as_whole_words_only():
    new_tokens = new_tokens_by_abstraction("TOK", 2)
    assert insert_new_tokens("TOKYO at night, MY_TOK, TOK2", new_tokens) == "TOKYO at night, MY_TOK, TOK2"
    assert insert_new_tokens("TOK's bowl, (TOK), TOK-like", new_tokens) == "<s0><s1>'s bowl, (<s0><s1>), <s0><s1>-like"


def second_text_encoder():
    """SDXL's second text encoder in small: with a projection, another hidden size, its own tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(1)
    config = CLIPTextConfig(
        vocab_size=514,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=16,
        bos_token_id=94,
        eos_token_id=95,
        pad_token_id=95,
    )
    return CLIPTextModelWithProjection(config)


def train(pairs, new_tokens, steps, train_steps, optimizer=None):
    """`steps` AdamW steps (with weight decay, which moves every row it sees) on the text encoders' outputs of a
    prompt holding the new tokens and others."""
    params = [param for param in new_tokens.parameters]
    optimizer = optimizer or torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    new_tokens.attach(optimizer, train_steps)
    for _ in range(steps):
        loss = 0
        for tokenizer, text_encoder in pairs:
            with torch.set_grad_enabled(new_tokens.trains):
                ids = tokenizer("a <s0><s1> dog", return_tensors="pt").input_ids
                loss = loss + text_encoder(ids)[0].pow(2).mean()
        if new_tokens.trains:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def test_only_the_new_rows_train_every_other_row_stays_bit_exact_and_they_stop_when_told():
    pipeline = tiny_pipeline()
    pairs = [(pipeline.tokenizer, pipeline.text_encoder), (copy.deepcopy(pipeline.tokenizer), second_text_encoder())]
    before = [text_encoder.get_input_embeddings().weight.detach().clone() for _, text_encoder in pairs]
    torch.manual_seed(0)
    new_tokens = NewTokenEmbeddings(dict(zip(("clip_l", "clip_g"), pairs)), ["<s0>", "<s1>"])
    ids = [tokenizer.convert_tokens_to_ids(["<s0>", "<s1>"]) for tokenizer, _ in pairs]
    initial = new_tokens.embeddings()
    assert list(initial) == ["clip_l", "clip_g"] and [t.shape for t in initial.values()] == [(2, 32), (2, 48)]
    for key, old in zip(initial, before):  # diffusers' initialisation: noise at the vocabulary's spread
        assert 0.5 < initial[key].std() / old.std() < 2
    assert all(text_encoder.get_input_embeddings().weight.dtype == torch.float32 for _, text_encoder in pairs)

    optimizer = train(pairs, new_tokens, steps=3, train_steps=3)
    trained = new_tokens.embeddings()
    assert not new_tokens.trains
    for (_, text_encoder), old, new_ids, key in zip(pairs, before, ids, trained):
        weight = text_encoder.get_input_embeddings().weight.detach()
        others = [row for row in range(weight.shape[0]) if row not in new_ids]
        assert torch.equal(weight[others], old[others]), "every other row stays bit-exact"
        assert not torch.allclose(trained[key], initial[key]), "the new rows trained"
    train(pairs, new_tokens, steps=2, train_steps=3, optimizer=optimizer)  # the optimizer's moments would move them
    for key, tensor in new_tokens.embeddings().items():
        assert torch.equal(tensor, trained[key]), "after their share of the run, the new rows stay as they are"


def test_the_gradient_reaches_the_new_rows_only():
    pipeline = tiny_pipeline()
    new_tokens = NewTokenEmbeddings({"clip_l": (pipeline.tokenizer, pipeline.text_encoder)}, ["<s0>"])
    ids = pipeline.tokenizer("a <s0> dog", return_tensors="pt").input_ids
    pipeline.text_encoder(ids)[0].square().sum().backward()  # a plain sum of a layer norm's output has no gradient
    grad = new_tokens.parameters[0].grad
    new_id = pipeline.tokenizer.convert_tokens_to_ids("<s0>")
    assert grad[new_id].abs().sum() > 0
    assert grad[torch.arange(grad.shape[0]) != new_id].abs().sum() == 0, "clipping and AdamW see the new rows only"


def test_checkpoint_state_restores_the_rows_and_whether_they_still_train(tmp_path):
    def fresh():
        pipeline = tiny_pipeline()
        pair = (pipeline.tokenizer, pipeline.text_encoder)
        return pair, NewTokenEmbeddings({"clip_l": pair}, ["<s0>", "<s1>"])

    pair, new_tokens = fresh()
    train([pair], new_tokens, steps=2, train_steps=2)
    new_tokens.save_state(tmp_path)
    (resumed_pair, resumed) = fresh()
    resumed.attach(torch.optim.AdamW(resumed.parameters, lr=0.1), train_steps=10)  # a run asking for more steps
    resumed.load_state(tmp_path)
    assert not resumed.trains and resumed.step == 2, "stopped tokens stay stopped"
    assert torch.equal(resumed.embeddings()["clip_l"], new_tokens.embeddings()["clip_l"])
    (_, other) = fresh()
    other.tokens = ["<s0>"]
    with pytest.raises(UserInputError, match="resume with the checkpoint's --token_abstraction"):
        other.load_state(tmp_path)


def test_a_text_encoder_that_already_has_the_tokens_is_refused():
    pipeline = tiny_pipeline()
    NewTokenEmbeddings({"clip_l": (pipeline.tokenizer, pipeline.text_encoder)}, ["<s0>"])
    with pytest.raises(ValueError, match=r"has the tokens \['<s0>'\] already"):
        NewTokenEmbeddings({"clip_l": (pipeline.tokenizer, tiny_clip_text_model())}, ["<s0>"])


def test_a_half_precision_text_encoder_trains_fp32_rows_and_computes_in_its_dtype():
    pipeline = tiny_pipeline()
    text_encoder = pipeline.text_encoder.to(torch.bfloat16)
    new_tokens = NewTokenEmbeddings({"clip_l": (pipeline.tokenizer, text_encoder)}, ["<s0>"])
    assert new_tokens.parameters[0].dtype == torch.float32
    ids = pipeline.tokenizer("a <s0> dog", return_tensors="pt").input_ids
    hidden = text_encoder(ids)[0]  # no autocast: layer norms in bf16 refuse fp32 inputs on the CPU
    assert hidden.dtype == torch.bfloat16
    hidden.float().sum().backward()
    assert new_tokens.parameters[0].grad[pipeline.tokenizer.convert_tokens_to_ids("<s0>")].abs().sum() > 0
