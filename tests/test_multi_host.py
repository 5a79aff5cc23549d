"""A swarm spread over separate hosts, the way it runs on several machines.

The DHT node, the two peers and the client each run on a test host of their own: a
network namespace with its own loopback and one address on a private bridge (tests/netns.py).
A process can reach another host only through the addresses the swarm announces, so these
tests fail if any part dials 127.0.0.1 or hands out a loopback address. Tolerance: the
peers run the same float32 ops as the local executor, so values agree to 1e-5.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from multi_host_client import run_study
from netns import NamespaceUnavailableError, namespace_hosts
from swarmlens.launch import local_swarm

pytestmark = [pytest.mark.network, pytest.mark.slow]

ATOL = 1e-5
CLIENT_SCRIPT = Path(__file__).with_name("multi_host_client.py")
CLIENT_TIMEOUT_S = 300
# The second peer listens on every address of its host and announces only this port there.
ANNOUNCED_PORT = 31337


@pytest.fixture(scope="module")
def hosts():
    try:
        with namespace_hosts(4) as hosts:
            yield hosts
    except NamespaceUnavailableError as error:
        pytest.skip(f"cannot create test hosts: {error}")


@pytest.fixture(scope="module")
def spread_swarm(hosts, checkpoint_path, tmp_path_factory):
    dht_host, first_peer_host, second_peer_host, _ = hosts
    second_peer_host = dataclasses.replace(
        second_peer_host, address="0.0.0.0",
        extra_args=("--port", str(ANNOUNCED_PORT), "--announce-host", second_peer_host.address),
    )
    with local_swarm(
        str(checkpoint_path), [(0, 15), (15, 30)], tmp_path_factory.mktemp("multi-host-logs"),
        dht_host=dht_host, peer_hosts=[first_peer_host, second_peer_host], peer_ready_timeout=300.0,
    ) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def remote_study(hosts, spread_swarm, checkpoint_path, tmp_path_factory):
    """Run the study from a client on the fourth host and load what it wrote."""
    out = tmp_path_factory.mktemp("multi-host-client") / "study.pt"
    command = [
        *hosts[3].command_prefix, sys.executable, str(CLIENT_SCRIPT),
        "--checkpoint", str(checkpoint_path), "--out", str(out), "--initial-peers", *spread_swarm.initial_peers,
    ]

    result = subprocess.run(command, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)

    assert result.returncode == 0, f"the client failed:\n{result.stderr[-4000:]}"
    return torch.load(out)


def test_dht_node_announces_host_address(spread_swarm, hosts):
    assert spread_swarm.initial_peers
    for maddr in spread_swarm.initial_peers:
        assert maddr.startswith(f"/ip4/{hosts[0].address}/tcp/")


def test_peer_announces_given_address(spread_swarm, hosts):
    peer = spread_swarm.peers[1]
    serving = re.search(r"Serving blocks .* at (.*)$", peer.log_path.read_text(), re.MULTILINE)

    assert serving is not None
    assert serving.group(1).split(", ") == [f"/ip4/{hosts[2].address}/tcp/{ANNOUNCED_PORT}/p2p/{peer.peer_id}"]


def test_chain_runs_on_both_hosts(remote_study, spread_swarm):
    assert remote_study["hop_peer_ids"] == [peer.peer_id for peer in spread_swarm.peers]


def test_results_match_local_executor(remote_study, local_model):
    local = run_study(local_model)

    torch.testing.assert_close(remote_study["logits"], local["logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(remote_study["patched"], local["patched"], atol=ATOL, rtol=0)
    assert torch.equal(remote_study["tokens"], local["tokens"])


def test_patch_value_skips_client(remote_study):
    early_node = remote_study["early_node"]

    assert early_node not in remote_study["sent_values"]
    assert early_node not in remote_study["received_values"]
