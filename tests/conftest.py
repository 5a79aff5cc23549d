"""Shared fixtures: leftover-process cleanup, an event loop thread and local swarms.

Test tiers: tests without a marker need no network. `network` tests start real hivemind
DHT nodes and p2pd daemons on 127.0.0.1, and `slow` tests start peers with the real model.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Awaitable, Iterator

import psutil
import pytest

# Fixtures that load the real default model, shared by every test module.
from tests.model_fixtures import checkpoint_path, hf_model, local_model, swarm_model, tokenizer  # noqa: F401

logger = logging.getLogger(__name__)

ECHO_RUNNER = "tests.echo_runner:create_echo_runner"
HIVEMIND_SOCKET_GLOB = "hivemind-*.sock"
SOCKET_DIR = Path("/tmp")
_PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "network: starts real hivemind DHT nodes and p2pd on 127.0.0.1")
    config.addinivalue_line("markers", "slow: starts peer processes that load the real model")


def _become_child_subreaper() -> None:
    """Make orphaned descendants (a p2pd whose DHT process died) children of this process.

    Without it they move to init, and the cleanup below could not tell them apart from the
    processes of other programs.
    """
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1)
    except (OSError, AttributeError) as error:
        logger.warning("Cannot become a child subreaper, orphans may survive the tests: %s", error)


def _bound_unix_socket_paths() -> set[str]:
    """Return the paths of unix sockets that some process has bound (from /proc/net/unix)."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return set()
    return {line.split()[-1] for line in lines if len(line.split()) >= 8}


def swarm_descendants() -> list[psutil.Process]:
    """Return descendants that belong to a swarm: p2pd, `swarmlens` commands, DHT processes.

    hivemind forks its DHT processes, so they have the command line of this process.
    Other descendants (such as torch_shm_manager) are left alone.
    """
    own_cmdline = psutil.Process().cmdline()
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmdline = child.cmdline()
            name = child.name()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if name == "p2pd" or "swarmlens" in cmdline or cmdline == own_cmdline:
            found.append(child)
    return found


def kill_descendants(grace_s: float = 5.0) -> list[str]:
    """SIGTERM swarm descendants of this process, SIGKILL those still alive after `grace_s`."""
    children = swarm_descendants()
    descriptions = []
    for child in children:
        try:
            descriptions.append(f"{child.pid} {' '.join(child.cmdline())[:120]}")
            child.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return descriptions


def _accepts_connections(path: Path) -> bool:
    """Return whether a process listens on the unix socket `path`, in any network namespace."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def remove_stale_sockets(created_after: set[Path]) -> list[Path]:
    """Remove hivemind socket files that are new since `created_after` and bound by no process.

    /proc/net/unix lists only the sockets of this network namespace, so a socket missing
    there is probed before removal: it may belong to a process in a test host namespace or
    to another test run.
    """
    bound = _bound_unix_socket_paths()
    removed = []
    for path in SOCKET_DIR.glob(HIVEMIND_SOCKET_GLOB):
        if path in created_after or str(path) in bound or _accepts_connections(path):
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


@pytest.fixture(scope="session", autouse=True)
def leftover_process_cleanup() -> Iterator[None]:
    """Kill processes the tests left running (DHT nodes, p2pd, peers) and their socket files."""
    _become_child_subreaper()
    sockets_before = set(SOCKET_DIR.glob(HIVEMIND_SOCKET_GLOB))
    yield
    leftovers = kill_descendants()
    if leftovers:
        logger.warning("Killed %d leftover processes: %s", len(leftovers), "; ".join(leftovers))
    remove_stale_sockets(sockets_before)


@pytest.fixture
def no_leftover_processes() -> Iterator[None]:
    """Fail the test if it leaves child processes running (then kill them)."""
    before = {child.pid for child in swarm_descendants()}
    yield
    new = [child for child in swarm_descendants() if child.pid not in before]
    if new:
        _, alive = psutil.wait_procs(new, timeout=5.0)
        if alive:
            names = [f"{child.pid} {' '.join(child.cmdline())[:80]}" for child in alive]
            for child in alive:
                child.kill()
            pytest.fail(f"test left {len(alive)} processes running: {names}")


class LoopThread:
    """An asyncio event loop in a daemon thread, shared by the async parts of several tests.

    hivemind's P2P handles stay bound to the loop that created them, so tests that share
    DHT nodes also share this loop.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Awaitable[Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        """Cancel the loop's tasks (as asyncio.run does), then stop and close it.

        Tasks left pending in a stopped loop are finalized later by the garbage collector,
        and hivemind's p2p client tasks then raise "Event loop is closed". Python 3.11.7
        prints that traceback with ast.parse, and if this happens inside another ast.parse
        (pytest's assertion rewriting), it fails with "SystemError: AST constructor
        recursion depth mismatch".
        """
        self.run(_cancel_other_tasks())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)
        self.loop.close()
        gc.collect()


async def _cancel_other_tasks() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.close()


@pytest.fixture(scope="session")
def local_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A DHT node and two peers serving the real default model (blocks 0:15 and 15:30).

    Session-scoped and lazy: it starts only when a test requests it, and once per session.
    """
    from swarmlens.launch import local_swarm as start_local_swarm

    with start_local_swarm(None, [(0, 15), (15, 30)], tmp_path_factory.mktemp("swarm-logs")) as swarm:
        yield swarm
