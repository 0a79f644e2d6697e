"""TrainsFor: parameters that train for the first steps of a run, then stay bit-exact, across a checkpoint; the text
encoders' schedules of a DreamBooth run."""

from __future__ import annotations

import torch

from peft_sara.script_utils.stopping import TrainsFor, text_encoder_schedules


def step(params, optimizer, schedule):
    if schedule.trains:
        sum(param.sum() for param in params).backward()
    else:  # as the loop does once they stop: no gradient, but another (regularised) parameter may still get one
        params[0].grad = torch.ones_like(params[0])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_parameters_train_for_their_steps_then_stay_bit_exact_also_after_a_resume(tmp_path):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(2, 2))]
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    schedule = TrainsFor("text_encoder", params, 2, optimizer)
    start = [param.detach().clone() for param in params]
    step(params, optimizer, schedule)
    assert schedule.trains
    step(params, optimizer, schedule)
    assert not schedule.trains and schedule.step == 2
    stopped = [param.detach().clone() for param in params]
    assert not torch.equal(stopped[0], start[0])
    for _ in range(2):  # weight decay, momentum and a stray gradient would all move them
        step(params, optimizer, schedule)
        assert all(torch.equal(param, kept) for param, kept in zip(params, stopped))
    schedule.save_state(tmp_path)
    resumed = TrainsFor("text_encoder", params, 10, torch.optim.AdamW(params, lr=0.1))  # a run asking for more
    resumed.load_state(tmp_path)
    assert not resumed.trains and resumed.step == 4


def test_the_text_encoders_schedules_attach_the_new_tokens_and_the_adapters_to_the_optimizer():
    from conftest import tiny_clip_text_model, tiny_pipeline

    from peft_sara.script_utils.pivotal import NewTokenEmbeddings

    adapter = torch.nn.Parameter(torch.randn(3))
    new_tokens = NewTokenEmbeddings({"clip_l": (tiny_pipeline().tokenizer, tiny_clip_text_model())}, ["<s0>"])
    optimizer = torch.optim.AdamW([adapter, *new_tokens.parameters], lr=0.1)
    assert text_encoder_schedules(optimizer, None, None, [adapter], None) == []
    (tokens_only,) = text_encoder_schedules(optimizer, new_tokens, 1, [], None)
    assert tokens_only is new_tokens and new_tokens.train_steps == 1
    (adapter_only,) = text_encoder_schedules(optimizer, None, None, [adapter], 1)
    assert isinstance(adapter_only, TrainsFor) and adapter_only.params == [adapter]
    step([adapter], optimizer, adapter_only)
    assert not adapter_only.trains and not new_tokens.trains, "both stop after their one optimizer step"
