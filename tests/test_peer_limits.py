"""Memory limits that a peer operator sets on the command line reach the block runner."""

import pytest

from swarmlens.intervene import BudgetError, ExecutionError
from swarmlens.launch import local_swarm

pytestmark = [pytest.mark.network, pytest.mark.slow]

PROMPT = "The capital of France is"
ONE_MIB = 2**20


@pytest.fixture(scope="module")
def small_peer_model(checkpoint_path, tmp_path_factory):
    from swarmlens.client import SwarmModel

    with local_swarm(
        str(checkpoint_path), [(0, 30)], tmp_path_factory.mktemp("small-peer-logs"), peer_ready_timeout=300.0,
        extra_peer_args=["--max-graph-bytes", str(ONE_MIB), "--max-session-bytes", str(ONE_MIB)],
    ) as swarm:
        model = SwarmModel.from_pretrained(str(checkpoint_path), initial_peers=swarm.initial_peers)
        yield model
        model.close()


def test_graph_memory_option_limits_values(small_peer_model):
    layers = small_peer_model.model.layers

    with pytest.raises((ExecutionError, BudgetError)) as caught:
        with small_peer_model.trace(PROMPT):
            layers[3].output[:, -1] = (layers[3].output.expand(256, -1, -1) * 2)[0, -1]

    assert "above the limit of 1.0 MiB" in str(caught.value)


def test_session_memory_option_limits_kept_values(small_peer_model):
    layers = small_peer_model.model.layers
    with small_peer_model.generate(PROMPT, max_new_tokens=2) as plain:
        pass

    with pytest.raises(ExecutionError) as caught:
        with small_peer_model.generate(PROMPT, max_new_tokens=2) as tracer:
            with tracer.iter[0]:  # 768 KiB of values, kept on the peer until step 1
                kept_value = layers[3].output[0, 0, 0].expand(3 * 2**16) + 1.0
            with tracer.iter[1]:
                layers[3].output[0, -1, 0] = (kept_value * layers[3].output[0, -1, 0])[0]

    assert plain.output.shape[1] > 0
    assert caught.value.original_type == "BudgetError"
    assert "session memory of 1.0 MiB" in str(caught.value)
