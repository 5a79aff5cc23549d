"""Generation with the local executor against Hugging Face `generate` with hooks (no network)."""

import pytest
import torch

from swarmlens.intervene import OrderError, TraceError

PROMPTS = ["The capital of France is", "def add(a, b):"]


def hf_generate(hf_model, tokenizer, prompts, max_new_tokens, hook=None, block=None):
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    handle = hf_model.model.layers[block].register_forward_hook(hook) if hook else None
    try:
        with torch.no_grad():
            return hf_model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                     temperature=None, top_k=None, top_p=None)
    finally:
        if handle:
            handle.remove()


def test_greedy_tokens_match_hf_generate(local_model, hf_model, tokenizer):
    with local_model.generate(PROMPTS, max_new_tokens=6) as tracer:
        pass
    torch.testing.assert_close(tracer.output, hf_generate(hf_model, tokenizer, PROMPTS, 6), rtol=0, atol=0)


def test_steering_every_step_matches_hook(local_model, hf_model, tokenizer):
    steer = torch.linspace(-3, 3, 576)
    with local_model.generate(PROMPTS[0], max_new_tokens=6) as tracer:
        with tracer.all():
            local_model.model.layers[8].output[:, -1] += steer

    def hook(module, args, output):
        output = output.clone()
        output[:, -1] += steer
        return output

    expected = hf_generate(hf_model, tokenizer, [PROMPTS[0]], 6, hook=hook, block=8)
    unsteered = hf_generate(hf_model, tokenizer, [PROMPTS[0]], 6)
    torch.testing.assert_close(tracer.output, expected, rtol=0, atol=0)
    assert not torch.equal(expected, unsteered)


def test_per_step_saves_are_lists_in_step_order(local_model):
    with local_model.generate(PROMPTS[0], max_new_tokens=4) as tracer:
        with tracer.all():
            hidden = local_model.model.layers[5].output.save()
        with tracer.iter[1:3]:
            middle = local_model.model.layers[5].output.save()
        prompt_only = local_model.model.layers[5].output.save()
    prompt_length = tracer.output.shape[1] - 4
    assert [value.shape[1] for value in hidden.value] == [prompt_length, 1, 1, 1]
    assert len(middle.value) == 2
    torch.testing.assert_close(middle.value[0], hidden.value[1])
    torch.testing.assert_close(middle.value[1], hidden.value[2])
    torch.testing.assert_close(prompt_only.value, hidden.value[0])


def test_next_moves_sites_to_next_step(local_model):
    with local_model.generate(PROMPTS[0], max_new_tokens=3) as tracer:
        first = local_model.model.layers[2].output.save()
        tracer.next()
        second = local_model.model.layers[2].output.save()
    assert first.value.shape[1] > 1
    assert second.value.shape[1] == 1


def test_step_value_used_outside_block_is_rejected(local_model):
    with pytest.raises(TraceError, match="inside a step block"):
        with local_model.generate(PROMPTS[0], max_new_tokens=3) as tracer:
            with tracer.all():
                hidden = local_model.model.layers[2].output
            hidden.save()


def test_step_out_of_range_is_rejected(local_model):
    with pytest.raises(TraceError, match="out of range"):
        with local_model.generate(PROMPTS[0], max_new_tokens=3) as tracer:
            with tracer.iter[5]:
                pass


def test_streamer_receives_each_step_in_order(local_model):
    streamed = []
    with local_model.generate(PROMPTS, max_new_tokens=4, stop_tokens=[], streamer=streamed.append) as tracer:
        pass
    assert len(streamed) == 4
    torch.testing.assert_close(torch.stack(streamed, dim=1), tracer.output[:, -4:], rtol=0, atol=0)


def test_value_of_one_step_used_later(local_model):
    layers = local_model.model.layers
    with local_model.generate(PROMPTS[0], max_new_tokens=3) as tracer:
        with tracer.iter[1]:
            first = layers[3].output[:, -1]
            read_at_first = first.save()
        with tracer.iter[2]:
            used_at_second = (first * 2).save()

    assert len(used_at_second.value) == 1
    torch.testing.assert_close(used_at_second.value[0], read_at_first.value[0] * 2, rtol=0, atol=0)


def test_value_of_one_step_used_earlier_is_rejected(local_model):
    layers = local_model.model.layers
    with pytest.raises(OrderError):
        with local_model.generate(PROMPTS[0], max_new_tokens=3) as tracer:
            with tracer.iter[2]:
                late = layers[3].output[:, -1]
            with tracer.iter[1]:
                layers[3].output[:, -1] = late


def test_multi_step_value_at_other_step_rejected(local_model):
    layers = local_model.model.layers
    with pytest.raises(TraceError, match="does not exist at step 2: its step block covers steps 0 to 1"):
        with local_model.generate(PROMPTS[0], max_new_tokens=3) as tracer:
            with tracer.iter[0:2]:
                early = layers[3].output[:, -1]
            with tracer.iter[2]:
                layers[3].output[:, -1] = early
