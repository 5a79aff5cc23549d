"""The local executor against plain Hugging Face forwards and hooks (no network).

Tolerance: the executor runs the same float32 ops as a plain forward, so values
agree to 1e-5 absolute (observed: bit-identical).
"""

import time

import pytest
import torch


ATOL = 1e-5
PROMPT = "The capital of France is"


def hf_forward(hf_model, tokenizer, prompt, **kwargs):
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        return hf_model(**encoded, **kwargs)


def test_empty_trace_logits_match_hf(local_model, hf_model, tokenizer):
    with local_model.trace(PROMPT) as tracer:
        pass
    expected = hf_forward(hf_model, tokenizer, PROMPT).logits
    torch.testing.assert_close(tracer.logits, expected, atol=ATOL, rtol=0)


def test_saved_block_outputs_match_hidden_states(local_model, hf_model, tokenizer):
    with local_model.trace(PROMPT):
        saved = [block.output.save() for block in local_model.model.layers]
    hidden_states = hf_forward(hf_model, tokenizer, PROMPT, output_hidden_states=True).hidden_states

    # hidden_states[i + 1] is block i's output, except the last, which has the final norm applied.
    for index in range(len(saved) - 1):
        torch.testing.assert_close(saved[index].value, hidden_states[index + 1], atol=ATOL, rtol=0)
    with torch.no_grad():
        normed = hf_model.model.norm(saved[-1].value)
    torch.testing.assert_close(normed, hidden_states[-1], atol=ATOL, rtol=0)


def test_slice_edit_matches_forward_hook(local_model, hf_model, tokenizer):
    block = 12
    with local_model.trace(PROMPT) as tracer:
        local_model.model.layers[block].output[:, -1] = local_model.model.layers[block].output[:, -1] * 3.0

    def hook(module, args, output):
        output = output.clone()
        output[:, -1] = output[:, -1] * 3.0
        return output

    handle = hf_model.model.layers[block].register_forward_hook(hook)
    try:
        expected = hf_forward(hf_model, tokenizer, PROMPT).logits
    finally:
        handle.remove()
    torch.testing.assert_close(tracer.logits, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(tracer.logits, hf_forward(hf_model, tokenizer, PROMPT).logits, atol=1e-3)


def test_whole_output_assignment_and_input_read(local_model, hf_model, tokenizer):
    with local_model.trace(PROMPT) as tracer:
        mlp_input = local_model.model.layers[4].mlp.input.save()
        local_model.model.layers[4].mlp.output = local_model.model.layers[4].mlp.output * 0
    captured = {}

    def pre_hook(module, args):
        captured["input"] = args[0].clone()

    def hook(module, args, output):
        return output * 0

    handles = [hf_model.model.layers[4].mlp.register_forward_pre_hook(pre_hook),
               hf_model.model.layers[4].mlp.register_forward_hook(hook)]
    try:
        expected = hf_forward(hf_model, tokenizer, PROMPT).logits
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(mlp_input.value, captured["input"], atol=ATOL, rtol=0)
    torch.testing.assert_close(tracer.logits, expected, atol=ATOL, rtol=0)


def test_logit_lens_module_calls_match_manual_projection(local_model, hf_model):
    with local_model.trace(PROMPT):
        hidden = local_model.model.layers[10].output.save()
        projected = local_model.lm_head(local_model.model.norm(hidden)).save()
    with torch.no_grad():
        expected = hf_model.lm_head(hf_model.model.norm(hidden.value))
    torch.testing.assert_close(projected.value, expected, atol=ATOL, rtol=0)


def test_save_is_a_snapshot_before_later_edits(local_model):
    with local_model.trace(PROMPT):
        before = local_model.model.layers[6].output.save()
        local_model.model.layers[6].output[:, -1] = 0.0
        after = local_model.model.layers[6].output.save()
    assert before.value[:, -1].abs().sum() > 0
    assert after.value[:, -1].abs().sum() == 0
    torch.testing.assert_close(before.value[:, :-1], after.value[:, :-1])


def test_torch_functions_and_operators_record(local_model):
    with local_model.trace(PROMPT):
        hidden = local_model.model.layers[3].output
        stacked = torch.stack([hidden[:, -1], hidden[:, 0]], dim=0).save()
        mixed = (2 * hidden[:, -1] - hidden[:, 0] / 4).abs().mean(dim=-1).save()
        top = hidden[0, -1].softmax(-1).topk(3).save()
    assert stacked.value.shape == (2, 1, 576)
    h = stacked.value
    torch.testing.assert_close(mixed.value, (2 * h[0] - h[1] / 4).abs().mean(dim=-1))
    values, indices = top.value  # named tuples come back as plain tuples, as from the swarm
    assert indices.shape == (3,)
    assert values[0] >= values[1] >= values[2]


def test_input_forms_give_same_logits(local_model, tokenizer):
    encoded = tokenizer(PROMPT, return_tensors="pt")
    forms = [PROMPT, [PROMPT], encoded["input_ids"], encoded["input_ids"][0],
             {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}]
    results = []
    for form in forms:
        with local_model.trace(form) as tracer:
            pass
        results.append(tracer.logits)
    for logits in results[1:]:
        torch.testing.assert_close(logits, results[0], atol=0, rtol=0)


def test_batched_prompt_matches_alone_within_tolerance(local_model):
    prompts = [PROMPT, "A much longer prompt that forces padding on the first row"]
    with local_model.trace(prompts) as batched:
        pass
    with local_model.trace(PROMPT) as alone:
        pass
    # Left padding: the prompt's tokens are the last ones of its row.
    torch.testing.assert_close(batched.logits[0, -alone.logits.shape[1]:], alone.logits[0], atol=1e-4, rtol=0)


def test_held_memory_limit_is_the_models_own(local_model):
    from swarmlens.intervene import BudgetError
    from swarmlens.intervene.budget import Limits

    default = local_model.limits
    assert default.max_held_bytes >= 2**40  # no cap by default in the user's own process
    local_model.limits = Limits(max_held_bytes=2**20)
    try:
        with pytest.raises(BudgetError, match="above the limit of 1.0 MiB"):
            with local_model.trace(PROMPT):
                [block.output.expand(64, -1, -1) * 2 for block in local_model.model.layers]
    finally:
        local_model.limits = default


def test_module_call_output_predicted_before_it_runs(local_model):
    from swarmlens.intervene import BudgetError

    began = time.perf_counter()
    with pytest.raises(BudgetError, match="would produce 983040000 elements"):
        with local_model.trace(PROMPT):
            hidden = local_model.model.layers[0].output[0, 0, 0].expand(1, 20000, 576) * 1.0
            local_model.lm_head(hidden).save()  # 11.5 M elements in, 983 M logits out

    # Running the call (566 GFLOP, 3.9 GB of logits) and checking its output afterwards takes over 10 s here.
    assert time.perf_counter() - began < 3.0
