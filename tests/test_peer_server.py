"""Peer processes (`swarmlens peer`) with the echo runner, started by `local_swarm` on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time

import msgpack
import psutil
import pytest

from conftest import ECHO_RUNNER, swarm_descendants
from swarmlens.launch import LaunchError, local_swarm
from swarmlens.peer import transport
from swarmlens.peer.errors import RemoteError
from swarmlens.swarm import fetch_spans, start_dht

pytestmark = pytest.mark.network

MODEL_ID = "echo-model"
NUM_BLOCKS = 6


@pytest.fixture(scope="module")
def echo_swarm(tmp_path_factory):
    started_at = time.perf_counter()
    with local_swarm(
        MODEL_ID, [(0, 3), (3, 6)], tmp_path_factory.mktemp("echo-logs"),
        runner_factory=ECHO_RUNNER, peer_ready_timeout=60.0,
    ) as swarm:
        swarm.ready_seconds = time.perf_counter() - started_at
        yield swarm


@pytest.fixture(scope="module")
def client(echo_swarm, loop_thread):
    dht = start_dht(echo_swarm.initial_peers, client_mode=True)
    p2p = loop_thread.run(dht.replicate_p2p())
    yield dht, p2p
    loop_thread.run(p2p.shutdown())
    dht.shutdown()


def forward(loop_thread, p2p, peer_id, request, timeout=10.0):
    response = loop_thread.run(
        transport.call(p2p, peer_id, transport.FORWARD_PROTOCOL, msgpack.packb(request), timeout=timeout)
    )
    return msgpack.unpackb(response)


def test_peers_become_ready(echo_swarm):
    assert len(echo_swarm.initial_peers) >= 1
    assert all(peer.peer_id for peer in echo_swarm.peers)
    assert echo_swarm.ready_seconds < 60.0


def test_peers_discovered_online(echo_swarm, client):
    dht, _ = client

    spans = fetch_spans(dht, MODEL_ID, NUM_BLOCKS)

    assert [(span.start, span.end, span.state) for span in spans] == [(0, 3, "online"), (3, 6, "online")]
    assert {span.peer_id for span in spans} == {peer.peer_id for peer in echo_swarm.peers}
    assert all(span.throughput == 1000.0 for span in spans)


def test_single_peer_request(echo_swarm, client, loop_thread):
    _, p2p = client

    response = forward(loop_thread, p2p, echo_swarm.peers[0].peer_id, {"value": 10})

    assert response == {"value": 13}


def test_chain_forwards_peer_to_peer(echo_swarm, client, loop_thread):
    _, p2p = client
    first, second = echo_swarm.peers

    response = forward(loop_thread, p2p, first.peer_id, {"value": 0, "chain": [second.peer_id]})

    assert response == {"value": 6}


def test_error_names_failing_peer(echo_swarm, client, loop_thread):
    _, p2p = client
    first, second = echo_swarm.peers

    with pytest.raises(RemoteError) as error:
        forward(loop_thread, p2p, first.peer_id, {"value": 0, "chain": [second.peer_id], "fail_at": 3})

    assert error.value.type_name == "ValueError"
    assert error.value.peer_id == second.peer_id
    assert "block 3" in error.value.message


def test_invalid_payload_is_remote_error(echo_swarm, client, loop_thread):
    _, p2p = client

    with pytest.raises(RemoteError) as error:
        loop_thread.run(transport.call(p2p, echo_swarm.peers[0].peer_id, transport.FORWARD_PROTOCOL, b"\xc1", timeout=10))

    assert error.value.peer_id == echo_swarm.peers[0].peer_id
    assert forward(loop_thread, p2p, echo_swarm.peers[0].peer_id, {"value": 1}) == {"value": 4}


def test_requests_logged_per_request(echo_swarm, client, loop_thread):
    _, p2p = client
    forward(loop_thread, p2p, echo_swarm.peers[1].peer_id, {"value": 5})
    time.sleep(0.2)

    log = echo_swarm.peers[1].log_path.read_text()

    assert "INFO swarmlens.peer.server: forward 3:6 from ..." in log
    assert " B in, " in log
    assert " ms" in log


def test_status_command_lists_peers(echo_swarm):
    result = subprocess.run(
        [sys.executable, "-m", "swarmlens", "status", "--model-id", MODEL_ID, "--num-blocks", str(NUM_BLOCKS),
         "--initial-peers", *echo_swarm.initial_peers],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert "0:3" in result.stdout
    assert "3:6" in result.stdout
    assert "Complete:" in result.stdout


@pytest.fixture(scope="module")
def limited_swarm(tmp_path_factory):
    with local_swarm(
        MODEL_ID + "-limited", [(0, 6)], tmp_path_factory.mktemp("limited-logs"),
        runner_factory=ECHO_RUNNER, peer_ready_timeout=60.0,
        extra_peer_args=[
            "--max-request-bytes", "1000", "--request-timeout", "1.5",
            "--max-concurrent-requests", "1", "--max-waiting-requests", "0",
        ],
    ) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def limited_client(limited_swarm, loop_thread):
    dht = start_dht(limited_swarm.initial_peers, client_mode=True)
    p2p = loop_thread.run(dht.replicate_p2p())
    yield p2p
    loop_thread.run(p2p.shutdown())
    dht.shutdown()


def test_oversize_request_rejected(limited_swarm, limited_client, loop_thread):
    peer_id = limited_swarm.peers[0].peer_id

    with pytest.raises(RemoteError) as error:
        forward(loop_thread, limited_client, peer_id, {"value": 0, "padding": "x" * 2000})

    assert error.value.type_name == "RequestTooLargeError"
    assert forward(loop_thread, limited_client, peer_id, {"value": 0}) == {"value": 6}


def test_slow_request_times_out(limited_swarm, limited_client, loop_thread):
    peer_id = limited_swarm.peers[0].peer_id

    with pytest.raises(RemoteError) as error:
        forward(loop_thread, limited_client, peer_id, {"value": 0, "sleep": 5.0})

    assert error.value.type_name == "TimeoutError"
    assert "1.5 s" in error.value.message or "2 s" in error.value.message
    assert forward(loop_thread, limited_client, peer_id, {"value": 0}) == {"value": 6}


def test_busy_peer_rejects_extra_request(limited_swarm, limited_client, loop_thread):
    peer_id = limited_swarm.peers[0].peer_id

    async def two_at_once():
        payload = msgpack.packb({"value": 0, "sleep": 0.5})
        calls = [transport.call(limited_client, peer_id, transport.FORWARD_PROTOCOL, payload, timeout=10) for _ in range(2)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = loop_thread.run(two_at_once())

    errors = [result for result in results if isinstance(result, RemoteError)]
    assert len(errors) == 1
    assert errors[0].type_name == "PeerBusyError"


def test_sigterm_announces_offline_and_cleans_up(tmp_path, loop_thread, no_leftover_processes):
    with local_swarm(MODEL_ID + "-stop", [(0, 6)], tmp_path, runner_factory=ECHO_RUNNER, peer_ready_timeout=60.0) as swarm:
        peer = swarm.peers[0]
        peer_group = [peer.pid] + [child.pid for child in psutil.Process(peer.pid).children(recursive=True)]
        dht = start_dht(swarm.initial_peers, client_mode=True)
        try:
            os.kill(peer.pid, signal.SIGTERM)
            assert peer.process.wait(20) == 0

            offline = fetch_spans(dht, MODEL_ID + "-stop", NUM_BLOCKS, states=("offline",))
        finally:
            dht.shutdown()

        assert [span.peer_id for span in offline] == [peer.peer_id]
        _, alive = psutil.wait_procs([psutil.Process(pid) for pid in peer_group if psutil.pid_exists(pid)], timeout=5)
        assert [(process.pid, process.name(), process.status()) for process in alive] == []
        assert "stopped" in peer.log_path.read_text()


def test_failed_peer_start_shows_log_tail(tmp_path, no_leftover_processes):
    with pytest.raises(LaunchError) as error:
        with local_swarm(MODEL_ID, [(0, 6)], tmp_path, runner_factory="tests.echo_runner:no_such_factory"):
            pass

    message = str(error.value)
    assert "exited with code" in message
    assert "no_such_factory" in message


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_up_command_stops_everything_on_signal(tmp_path, signum):
    before = {child.pid for child in swarm_descendants()}
    up = subprocess.Popen(
        [sys.executable, "-m", "swarmlens", "up", "--model", MODEL_ID, "--peers", "0:3", "3:6",
         "--runner-factory", ECHO_RUNNER, "--log-dir", str(tmp_path), "--ready-timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output = []
    try:
        for line in up.stdout:
            output.append(line)
            if "Press Ctrl-C" in line:
                break
        assert any("--initial-peers /ip4/127.0.0.1/" in line for line in output), "".join(output)
        assert any(str(tmp_path) in line for line in output)
        started = [child for child in swarm_descendants() if child.pid not in before]
        assert len(started) >= 6  # up, DHT node, two peers, their DHT processes and p2pd

        up.send_signal(signum)
        up.wait(30)
    finally:
        if up.poll() is None:
            up.kill()

    _, alive = psutil.wait_procs(started, timeout=10)
    assert alive == []


def test_dht_command_stops_on_group_sigterm(tmp_path, no_leftover_processes):
    # Like `pkill -f "swarmlens dht"`, the signal reaches the hivemind DHT process and p2pd
    # too, and the command must still exit rather than wait for its DHT process forever.
    log_path = tmp_path / "dht.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "swarmlens", "dht"], stdout=log_file,
                                   stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "SWARMLENS_DHT_READY" not in log_path.read_text() and time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()
            time.sleep(0.2)

        os.killpg(process.pid, signal.SIGTERM)

        assert process.wait(30) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
