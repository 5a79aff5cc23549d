"""A peer dies; the client routes around it and returns the same result (real processes)."""

import os
import signal

import pytest
import torch


pytestmark = [pytest.mark.network, pytest.mark.slow]

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def redundant_swarm(checkpoint_path, tmp_path_factory):
    """Three peers: blocks 0:15 once, blocks 15:30 twice."""
    from swarmlens.launch import local_swarm

    with local_swarm(str(checkpoint_path), [(0, 15), (15, 30), (15, 30)], tmp_path_factory.mktemp("logs")) as swarm:
        yield swarm


def test_trace_and_generation_survive_a_killed_peer(redundant_swarm, checkpoint_path, local_model):
    from swarmlens.client import SwarmModel

    with local_model.trace(PROMPT) as expected_trace:
        pass
    with local_model.generate(PROMPT, max_new_tokens=5) as expected_generation:
        pass

    with SwarmModel.from_pretrained(str(checkpoint_path), initial_peers=redundant_swarm.initial_peers) as model:
        with model.trace(PROMPT) as before:
            pass
        used = before.result.hops[-1]["peer_id"]
        assert used in [peer.peer_id for peer in redundant_swarm.peers], (before.result.hops, redundant_swarm.peers)
        victim = next(peer for peer in redundant_swarm.peers if peer.peer_id == used)
        os.killpg(victim.process.pid, signal.SIGKILL)
        victim.process.wait()

        with model.trace(PROMPT) as after:
            pass
        with model.generate(PROMPT, max_new_tokens=5) as generation:
            pass

    torch.testing.assert_close(after.logits, expected_trace.logits, atol=1e-5, rtol=0)
    assert after.result.hops[-1]["peer_id"] != used
    assert torch.equal(generation.output, expected_generation.output)
