"""Aliases, graph files, skip, stop, scan and .inputs, locally and through real peers.

Tolerance: float32, 1e-5 absolute, as in the other end-to-end tests.
"""

import pytest
import torch

from swarmlens.intervene import ExecutionError, InvalidGraphError, TraceError, load_graph, save_graph

ATOL = 1e-5
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def swarm_model(request, checkpoint_path):
    from swarmlens.client import SwarmModel

    local_swarm = request.getfixturevalue("local_swarm")
    model = SwarmModel.from_pretrained(str(checkpoint_path), initial_peers=local_swarm.initial_peers,
                                       rename={"model.layers": "blocks", "self_attn": "attention"})
    yield model
    model.close()


def test_aliases_record_real_paths(hf_model, tokenizer):
    from swarmlens.intervene import LocalModel

    model = LocalModel(hf_model, tokenizer, rename={"model.layers": "blocks", "self_attn": "attention"})
    with model.trace(PROMPT) as tracer:
        aliased = model.blocks[3].attention.o_proj.output.save()
        real = model.model.layers[3].self_attn.o_proj.output.save()
    assert tracer.graph.nodes[0].site.module == "model.layers.3.self_attn.o_proj"
    torch.testing.assert_close(aliased.value, real.value, atol=0, rtol=0)


def test_alias_of_unknown_module_is_rejected(hf_model, tokenizer):
    from swarmlens.intervene import LocalModel

    with pytest.raises(ValueError, match="no module path or name 'decoder'"):
        LocalModel(hf_model, tokenizer, rename={"decoder": "blocks"})


def test_graph_file_round_trip_reruns(local_model, tmp_path):
    with local_model.trace(PROMPT) as tracer:
        local_model.model.layers[7].output[:, -1] = local_model.model.layers[7].output[:, -1] * 0.5
        saved = local_model.model.layers[20].output.save()
    path = tmp_path / "study.swarmlens"
    save_graph(tracer.graph, path)

    result = local_model.run_graph(load_graph(path), PROMPT)
    torch.testing.assert_close(result.saved[saved.node], saved.value, atol=0, rtol=0)
    torch.testing.assert_close(result.logits, tracer.logits, atol=0, rtol=0)


def test_graph_file_rejects_other_files(tmp_path):
    path = tmp_path / "not-a-graph"
    path.write_bytes(b"\x00\x01 definitely not msgpack")
    with pytest.raises(ValueError):
        load_graph(path)


def test_skip_uses_given_output(local_model):
    with local_model.trace(PROMPT):
        local_model.model.layers[5].skip(local_model.model.layers[5].input)
        skipped = local_model.model.layers[5].output.save()
        previous = local_model.model.layers[4].output.save()
    torch.testing.assert_close(skipped.value, previous.value, atol=0, rtol=0)


def skip_and_call_study(model):
    mlp = model.model.layers[3].mlp
    with model.trace(PROMPT):
        hidden = mlp.input
        mlp.skip(hidden * 0)
        called = mlp(hidden).save()
        output = mlp.output.save()
        inputs = mlp.input.save()
    return called.value, output.value, inputs.value


def test_module_call_ignores_skip_of_that_module(local_model, hf_model):
    called, output, inputs = skip_and_call_study(local_model)

    with torch.no_grad():
        expected = hf_model.model.layers[3].mlp(inputs)
    torch.testing.assert_close(called, expected, atol=ATOL, rtol=0)
    assert torch.count_nonzero(output) == 0


def test_module_call_with_skip_through_swarm(swarm_model, local_model):
    for remote, local in zip(skip_and_call_study(swarm_model), skip_and_call_study(local_model)):
        torch.testing.assert_close(remote, local, atol=ATOL, rtol=0)


def test_skip_value_from_later_site_is_rejected(local_model):
    with pytest.raises(InvalidGraphError, match="skips model.layers.5"):
        with local_model.trace(PROMPT):
            local_model.model.layers[5].skip(local_model.model.layers[9].output)


def test_stop_ends_forward_early(local_model, hf_model, tokenizer):
    with local_model.trace(PROMPT) as tracer:
        hidden = local_model.model.layers[10].output.save()
        tracer.stop()
    assert tracer.logits is None
    with torch.no_grad():
        expected = hf_model(**tokenizer(PROMPT, return_tensors="pt"), output_hidden_states=True).hidden_states[11]
    torch.testing.assert_close(hidden.value, expected, atol=ATOL, rtol=0)


def test_nothing_may_follow_stop(local_model):
    with pytest.raises(InvalidGraphError, match="nothing may follow tracer.stop"):
        with local_model.trace(PROMPT) as tracer:
            tracer.stop()
            local_model.model.layers[3].output.save()


def test_scan_reports_shapes_on_meta(local_model):
    with local_model.scan(PROMPT) as tracer:
        keys = local_model.model.layers[3].self_attn.k_proj.output.save()
        mean = local_model.model.layers[3].output.mean(dim=-1).save()
    assert keys.value.device.type == "meta"
    assert tuple(keys.value.shape) == (1, 5, 192)
    assert tuple(mean.value.shape) == (1, 5)
    assert tracer.logits.shape[-1] == 49152


def test_scan_catches_shape_error_with_line(local_model):
    with pytest.raises(ExecutionError) as raised:
        with local_model.scan(PROMPT):
            (local_model.model.layers[3].output @ torch.ones(3, 3)).save()
    assert raised.value.original_type == "RuntimeError"
    assert "test_language_features.py" in str(raised.value)


def test_inputs_read_and_write(local_model, hf_model, tokenizer):
    with local_model.trace(PROMPT) as tracer:
        args, kwargs = local_model.model.layers[6].inputs[0], local_model.model.layers[6].inputs[1]
        position_ids = kwargs["position_ids"].save()
        local_model.model.layers[6].inputs = ((args[0] * 2,), {})

    def pre_hook(module, args):
        return (args[0] * 2,)

    handle = hf_model.model.layers[6].register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            expected = hf_model(**tokenizer(PROMPT, return_tensors="pt")).logits
    finally:
        handle.remove()
    assert position_ids.value.tolist() == [[0, 1, 2, 3, 4]]
    torch.testing.assert_close(tracer.logits, expected, atol=ATOL, rtol=0)


def test_stop_in_generation_is_rejected(local_model):
    with pytest.raises(TraceError, match="not available in generation"):
        with local_model.generate(PROMPT, max_new_tokens=2) as tracer:
            tracer.stop()


@pytest.mark.network
@pytest.mark.slow
def test_features_match_local_through_swarm(swarm_model, local_model):
    def study(model, blocks, attention):
        with model.trace(PROMPT) as tracer:
            getattr(blocks(model)[8], "skip")(blocks(model)[8].input * 0.5)
            keys = getattr(blocks(model)[12], attention).k_proj.output.save()
            args = blocks(model)[20].inputs[0]
            blocks(model)[20].inputs = ((args[0] + 1.0,), {})
            logits = model.lm_head.output.save()
        return tracer, keys.value, logits.value

    remote = study(swarm_model, lambda model: model.blocks, "attention")
    local = study(local_model, lambda model: model.model.layers, "self_attn")
    torch.testing.assert_close(remote[1], local[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(remote[2], local[2], atol=ATOL, rtol=0)


@pytest.mark.network
@pytest.mark.slow
def test_stop_through_swarm_skips_later_peer(swarm_model, local_model):
    with swarm_model.trace(PROMPT) as tracer:
        hidden = swarm_model.blocks[10].output.save()
        tracer.stop()
    with local_model.trace(PROMPT):
        expected = local_model.model.layers[10].output.save()
    assert tracer.logits is None
    assert [(hop["start"], hop["end"]) for hop in tracer.result.hops] == [(0, 15)]
    torch.testing.assert_close(hidden.value, expected.value, atol=ATOL, rtol=0)


CLEAN = "The capital of France is"
CORRUPTED = "The capital of Germany is a city called"
BATCH_ATOL = 1e-4  # a padded batch takes another attention kernel path than a single prompt


def patch_study(model):
    with model.trace() as tracer:
        with tracer.invoke(CLEAN):
            clean = model.model.layers[12].output[:, -1]
            clean_logits = model.lm_head.output[:, -1].save()
        with tracer.invoke(CORRUPTED):
            model.model.layers[12].output[:, -1] = clean
            patched_logits = model.lm_head.output[:, -1].save()
    return tracer, clean_logits.value, patched_logits.value


def test_invokes_see_their_own_rows_and_share_values(local_model, hf_model, tokenizer):
    tracer, clean_logits, patched_logits = patch_study(local_model)
    assert tracer.logits.shape[0] == 2

    with torch.no_grad():
        clean_run = hf_model(**tokenizer(CLEAN, return_tensors="pt"), output_hidden_states=True)
    torch.testing.assert_close(clean_logits, clean_run.logits[:, -1], atol=BATCH_ATOL, rtol=0)

    clean_hidden = clean_run.hidden_states[13][:, -1]

    def hook(module, args, output):
        output = output.clone()
        output[:, -1] = clean_hidden
        return output

    handle = hf_model.model.layers[12].register_forward_hook(hook)
    try:
        with torch.no_grad():
            expected = hf_model(**tokenizer(CORRUPTED, return_tensors="pt")).logits[:, -1]
    finally:
        handle.remove()
    torch.testing.assert_close(patched_logits, expected, atol=BATCH_ATOL, rtol=0)


def test_tuple_site_in_invoke_is_rejected(local_model):
    with pytest.raises(TraceError, match="not a single tensor"):
        with local_model.trace() as tracer:
            with tracer.invoke(CLEAN):
                local_model.model.layers[3].self_attn.output.save()


def test_trace_without_inputs_is_rejected(local_model):
    with pytest.raises(TraceError, match="no inputs"):
        with local_model.trace():
            pass


@pytest.mark.network
@pytest.mark.slow
def test_invokes_through_swarm_match_local(swarm_model, local_model):
    remote = patch_study(swarm_model)
    local = patch_study(local_model)
    torch.testing.assert_close(remote[0].logits, local[0].logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(remote[2], local[2], atol=ATOL, rtol=0)


def hf_attentions(hf_model, tokenizer, prompt):
    from swarmlens.intervene.local import attention_implementation

    with torch.no_grad(), attention_implementation(hf_model.config, "eager"):
        return hf_model(**tokenizer(prompt, return_tensors="pt"), output_attentions=True).attentions


def attention_study(model):
    with model.trace(PROMPT, attn_implementation="eager"):
        weights = [model.model.layers[block].self_attn.output[1].save() for block in (2, 14, 15, 29)]
    return [proxy.value for proxy in weights]


def test_eager_attention_weights_match_output_attentions(local_model, hf_model, tokenizer):
    expected = hf_attentions(hf_model, tokenizer, PROMPT)
    for value, block in zip(attention_study(local_model), (2, 14, 15, 29)):
        torch.testing.assert_close(value, expected[block], atol=ATOL, rtol=0)
    assert hf_model.config._attn_implementation == "sdpa"


def test_unknown_attn_implementation_is_rejected(local_model):
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        local_model.trace(PROMPT, attn_implementation="flash")


@pytest.mark.network
@pytest.mark.slow
def test_attention_weights_through_swarm(swarm_model, hf_model, tokenizer):
    expected = hf_attentions(hf_model, tokenizer, PROMPT)
    for value, block in zip(attention_study(swarm_model), (2, 14, 15, 29)):
        torch.testing.assert_close(value, expected[block], atol=ATOL, rtol=0)
