"""End to end: real peer processes on loopback serving the real default model.

Every result is compared with the local executor and with plain Hugging Face
outputs. Tolerance: peers run the same float32 ops as a local forward, so
values agree to 1e-5 absolute (observed: bit-identical).
"""

import pytest
import torch

from swarmlens.intervene import ExecutionError, InvalidGraphError, OrderError, TraceError

pytestmark = [pytest.mark.network, pytest.mark.slow]

ATOL = 1e-5
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a quiet village by the sea,"]


@pytest.fixture
def forward_calls(swarm_model, monkeypatch):
    """Count the requests the client sends to the swarm."""
    calls = []
    original = swarm_model.connection.forward

    def counting_forward(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(swarm_model.connection, "forward", counting_forward)
    return calls


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_hugging_face(swarm_model, hf_model, tokenizer, prompt):
    with swarm_model.trace(prompt) as tracer:
        pass
    with torch.no_grad():
        expected = hf_model(**tokenizer(prompt, return_tensors="pt")).logits
    torch.testing.assert_close(tracer.logits, expected, atol=ATOL, rtol=0)


def test_saved_block_outputs_match_local_and_hf(swarm_model, local_model, hf_model, tokenizer):
    prompt = PROMPTS[0]

    def study(model):
        with model.trace(prompt):
            saved = [block.output.save() for block in model.model.layers]
        return [proxy.value for proxy in saved]

    remote, local = study(swarm_model), study(local_model)
    with torch.no_grad():
        hidden_states = hf_model(**tokenizer(prompt, return_tensors="pt"), output_hidden_states=True).hidden_states

    for index, (remote_value, local_value) in enumerate(zip(remote, local)):
        torch.testing.assert_close(remote_value, local_value, atol=ATOL, rtol=0)
        if index < len(remote) - 1:  # the last hidden state has the final norm applied
            torch.testing.assert_close(remote_value, hidden_states[index + 1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("block", [3, 14, 15, 27])
def test_edit_matches_forward_hook(swarm_model, hf_model, tokenizer, block):
    prompt = PROMPTS[0]
    with swarm_model.trace(prompt) as tracer:
        swarm_model.model.layers[block].output[:, -1] = swarm_model.model.layers[block].output[:, -1] * 0.5

    def hook(module, args, output):
        output = output.clone()
        output[:, -1] = output[:, -1] * 0.5
        return output

    handle = hf_model.model.layers[block].register_forward_hook(hook)
    try:
        with torch.no_grad():
            expected = hf_model(**tokenizer(prompt, return_tensors="pt")).logits
    finally:
        handle.remove()
    torch.testing.assert_close(tracer.logits, expected, atol=ATOL, rtol=0)


def test_cross_block_patch_travels_peer_to_peer(swarm_model, local_model):
    def study(model):
        with model.trace(PROMPTS[0]) as tracer:
            early = model.model.layers[5].output[:, -1]
            model.model.layers[25].output[:, -1] = model.model.layers[25].output[:, -1] + early
            logits = model.lm_head.output.save()
        return tracer, early.node, logits.value

    tracer, early_id, remote_logits = study(swarm_model)
    local_tracer, _, local_logits = study(local_model)
    torch.testing.assert_close(remote_logits, local_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(tracer.logits, local_tracer.logits, atol=ATOL, rtol=0)

    transfer = tracer.result.transfer
    assert early_id not in transfer["sent_values"]
    assert early_id not in transfer["received_values"]
    first, second = tracer.result.hops
    assert (first["start"], first["end"], second["start"], second["end"]) == (0, 15, 15, 30)
    assert early_id in first["sent"]
    assert early_id in second["received"]
    assert early_id not in second["sent"]


def test_logit_lens_projects_on_client(swarm_model, local_model):
    def study(model):
        with model.trace(PROMPTS[0]) as tracer:
            lens = [model.lm_head(model.model.norm(block.output[:, -1])).save() for block in model.model.layers]
        return tracer, [proxy.value for proxy in lens]

    tracer, remote = study(swarm_model)
    _, local = study(local_model)
    for remote_value, local_value in zip(remote, local):
        torch.testing.assert_close(remote_value, local_value, atol=ATOL, rtol=0)
    assert all(location == swarm_model.num_blocks
               for node, location in zip(tracer.graph.nodes, tracer.result.partition.locations)
               if node.op.value == "call_module")


def test_invalid_graphs_fail_before_sending(swarm_model, forward_calls):
    with pytest.raises(InvalidGraphError, match="no submodule 'mlpp'"):
        with swarm_model.trace(PROMPTS[0]):
            swarm_model.model.layers[3].mlpp.output.save()
    with pytest.raises(TraceError, match="not allowed"):
        with swarm_model.trace(PROMPTS[0]):
            torch.logsumexp(swarm_model.model.layers[3].output, dim=-1).save()
    with pytest.raises(OrderError, match="runs later"):
        with swarm_model.trace(PROMPTS[0]):
            swarm_model.model.layers[3].output = swarm_model.model.layers[20].output
    assert forward_calls == []


def test_peer_error_names_type_peer_line(swarm_model, local_swarm, forward_calls):
    with pytest.raises(ExecutionError) as raised:
        with swarm_model.trace(PROMPTS[0]):
            (swarm_model.model.layers[20].output @ torch.ones(3, 3)).save()
    error = raised.value
    assert len(forward_calls) == 1
    assert error.original_type == "RuntimeError"
    assert error.peer == next(peer.peer_id for peer in local_swarm.peers if peer.start == 15)
    assert "test_swarm_end_to_end.py" in str(error)
    assert "(swarm_model.model.layers[20].output @ torch.ones(3, 3)).save()" in str(error)


def test_peer_survives_malformed_requests(swarm_model, local_swarm):
    from swarmlens.peer.errors import RemoteError
    from swarmlens.peer.transport import FORWARD_PROTOCOL, call

    connection = swarm_model.connection
    peer_id = local_swarm.peers[0].peer_id
    for payload in (b"", b"\x00" * 100, b"\x93\x01\x02", b"\xde\xad\xbe\xef" * 1000):
        with pytest.raises(RemoteError, match="WireError"):
            connection.run(call(connection._p2p, peer_id, FORWARD_PROTOCOL, payload, timeout=30))

    with swarm_model.trace(PROMPTS[0]) as tracer:
        pass
    assert tracer.logits.shape[-1] == swarm_model.config.vocab_size
