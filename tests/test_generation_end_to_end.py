"""Generation through real peer processes on loopback, against HF `generate` and the local executor."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.test_generation_local import hf_generate

pytestmark = [pytest.mark.network, pytest.mark.slow]

ATOL = 1e-5
PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time"]


def open_sessions(swarm_model, local_swarm) -> list[int]:
    return [swarm_model.connection.peer_info(peer.peer_id)["open_sessions"] for peer in local_swarm.peers]


@pytest.mark.parametrize("prompts", [PROMPTS[0], PROMPTS[1], PROMPTS])
def test_greedy_tokens_match_hf_generate(swarm_model, hf_model, tokenizer, prompts):
    with swarm_model.generate(prompts, max_new_tokens=8) as tracer:
        pass
    expected = hf_generate(hf_model, tokenizer, prompts if isinstance(prompts, list) else [prompts], 8)
    torch.testing.assert_close(tracer.output, expected, rtol=0, atol=0)


def test_batched_rows_equal_unbatched_runs(swarm_model):
    with swarm_model.generate(PROMPTS, max_new_tokens=6, stop_tokens=[]) as batched:
        pass
    for row, prompt in enumerate(PROMPTS):
        with swarm_model.generate(prompt, max_new_tokens=6, stop_tokens=[]) as alone:
            pass
        length = alone.output.shape[1]
        assert torch.equal(batched.output[row, -length:], alone.output[0])


def test_sampling_with_seed_is_repeatable(swarm_model):
    outputs = []
    for _ in range(2):
        with swarm_model.generate(PROMPTS[2], max_new_tokens=8, do_sample=True, seed=11, temperature=0.9,
                                  top_k=40, top_p=0.95) as tracer:
            pass
        outputs.append(tracer.output)
    with swarm_model.generate(PROMPTS[2], max_new_tokens=8, do_sample=True, seed=12, temperature=0.9,
                              top_k=40, top_p=0.95) as other:
        pass
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], other.output)


def test_steering_every_step_matches_hook(swarm_model, hf_model, tokenizer):
    steer = 8 * torch.randn(576, generator=torch.Generator().manual_seed(0))
    with swarm_model.generate(PROMPTS[0], max_new_tokens=6) as tracer:
        with tracer.all():
            swarm_model.model.layers[20].output[:, -1] += steer

    def hook(module, args, output):
        output = output.clone()
        output[:, -1] += steer
        return output

    expected = hf_generate(hf_model, tokenizer, [PROMPTS[0]], 6, hook=hook, block=20)
    torch.testing.assert_close(tracer.output, expected, rtol=0, atol=0)
    assert not torch.equal(expected, hf_generate(hf_model, tokenizer, [PROMPTS[0]], 6))


def test_per_step_saves_match_local_executor(swarm_model, local_model):
    def study(model):
        with model.generate(PROMPTS, max_new_tokens=5) as tracer:
            with tracer.all():
                early = model.model.layers[3].output[:, -1]
                model.model.layers[24].output[:, -1] += 0.5 * early
                late = model.model.layers[24].output.save()
                lens = model.lm_head(model.model.norm(model.model.layers[12].output[:, -1])).save()
        return tracer, late.value, lens.value

    remote_tracer, remote_late, remote_lens = study(swarm_model)
    local_tracer, local_late, local_lens = study(local_model)
    assert torch.equal(remote_tracer.output, local_tracer.output)
    assert len(remote_late) == len(local_late) == 5
    for remote_value, local_value in zip(remote_late + remote_lens, local_late + local_lens):
        torch.testing.assert_close(remote_value, local_value, atol=ATOL, rtol=0)


def test_later_block_value_edits_earlier_block_next_step(swarm_model, local_model):
    # Both blocks are on the first peer, which lists its nodes by block: the edit at block 2
    # comes before the read at block 10 that it uses.
    def study(model):
        layers = model.model.layers
        with model.generate(PROMPTS[0], max_new_tokens=3) as tracer:
            with tracer.iter[0]:
                late = layers[10].output[:, -1]
            with tracer.iter[1]:
                layers[2].output[:, -1] += late
        return tracer.output

    assert torch.equal(study(swarm_model), study(local_model))


def test_bytes_per_step_do_not_grow_with_graph(swarm_model):
    def bytes_sent(edits: int) -> list[int]:
        with swarm_model.generate(PROMPTS[0], max_new_tokens=4, stop_tokens=[]) as tracer:
            for index in range(edits):
                block = swarm_model.model.layers[index % 30]
                block.output[:, 0] = block.output[:, 0] * 1.0
        return tracer.result.transfer["bytes_sent_per_step"]

    small, large = bytes_sent(1), bytes_sent(60)
    assert small[1:] == large[1:]
    assert large[0] == small[0]  # subgraphs travel in the open message, not with the hidden states


def test_sessions_freed_after_generation(swarm_model, local_swarm):
    with swarm_model.generate(PROMPTS[0], max_new_tokens=3) as tracer:
        pass
    assert tracer.output.shape[1] > 3
    deadline = time.monotonic() + 10
    while open_sessions(swarm_model, local_swarm) != [0, 0] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert open_sessions(swarm_model, local_swarm) == [0, 0]


CLIENT_SCRIPT = """
import sys
from swarmlens.client import SwarmModel
model = SwarmModel.from_pretrained(sys.argv[1], initial_peers=sys.argv[2:])
print("CONNECTED", flush=True)
with model.generate("Write a long story about the sea.", max_new_tokens=400, stop_tokens=[]) as tracer:
    pass
"""


def test_sessions_freed_when_client_is_killed(swarm_model, local_swarm, checkpoint_path):
    client = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, str(checkpoint_path), *local_swarm.initial_peers],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert client.stdout.readline().strip() == "CONNECTED"
        deadline = time.monotonic() + 60
        while open_sessions(swarm_model, local_swarm) != [1, 1] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert open_sessions(swarm_model, local_swarm) == [1, 1]
    finally:
        os.killpg(client.pid, signal.SIGKILL)
        client.wait()

    deadline = time.monotonic() + 30
    while open_sessions(swarm_model, local_swarm) != [0, 0] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert open_sessions(swarm_model, local_swarm) == [0, 0]


def test_streamer_receives_each_step_in_order(swarm_model):
    streamed = []
    with swarm_model.generate(PROMPTS, max_new_tokens=5, stop_tokens=[], streamer=streamed.append) as tracer:
        pass
    assert len(streamed) == 5
    torch.testing.assert_close(torch.stack(streamed, dim=1), tracer.output[:, -5:], rtol=0, atol=0)
