"""Start a local swarm on loopback: one DHT node process and one process per peer.

Each process may also run on another `Host`, for example a network namespace, so that
tests can place the DHT node and the peers on separate addresses. Every child runs `python -m swarmlens ...` in its own process group (session), so that
stopping the group also stops the hivemind DHT process and p2pd daemon that the child
starts. Children write stdout and stderr to one log file each, and report readiness by a
marker line in it (`SWARMLENS_DHT_READY <maddr>`, `SWARMLENS_PEER_READY peer_id=...`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import swarmlens

logger = logging.getLogger(__name__)

DHT_READY_MARKER = "SWARMLENS_DHT_READY"
PEER_READY_MARKER = "SWARMLENS_PEER_READY"  # the same as swarmlens.peer.server.READY_MARKER
DEFAULT_SPANS: tuple[tuple[int, int], ...] = ((0, 15), (15, 30))

# A `swarmlens dht` process imports hivemind and starts p2pd; it took about 2.3 s on loopback
# with 2 CPU cores.
DEFAULT_DHT_READY_TIMEOUT_S = 60.0
# A peer may first convert the default GGUF checkpoint once, and then loads its blocks.
DEFAULT_PEER_READY_TIMEOUT_S = 600.0
# Seconds a child gets to stop after SIGTERM (announce offline, stop its DHT and p2pd)
# before its whole process group is killed.
STOP_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 30
POLL_INTERVAL_S = 0.1

_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """A child process of a local swarm failed to start."""


@dataclasses.dataclass(frozen=True)
class Host:
    """A place to run a swarm process: the address it listens on, the command prefix that
    starts a program there, such as ("ip", "netns", "exec", "<namespace>"), and extra
    arguments for the `swarmlens` command run there, such as ("--announce-host", ...).

    The prefix must exec the program in place (keep its pid), so that stopping the child's
    process group stops the program.
    """

    address: str = "127.0.0.1"
    command_prefix: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()


LOOPBACK = Host()


@dataclasses.dataclass
class PeerProcess:
    """A running peer process that serves blocks `start` to `end - 1`."""

    pid: int
    peer_id: str
    start: int
    end: int
    log_path: Path
    process: subprocess.Popen = dataclasses.field(repr=False)


@dataclasses.dataclass
class LocalSwarm:
    """A DHT node and peers, by default on loopback; `initial_peers` are the maddrs to join it."""

    initial_peers: list[str]
    peers: list[PeerProcess]
    log_dir: Path
    dht_process: subprocess.Popen | None = dataclasses.field(default=None, repr=False)
    dht_log_path: Path | None = None

    def stop(self) -> None:
        """Stop every process of the swarm, peers first; safe to call more than once."""
        with _signals_deferred():
            for peer in reversed(self.peers):
                _stop_process_group(peer.process, f"peer {peer.start}:{peer.end}")
            if self.dht_process is not None:
                _stop_process_group(self.dht_process, "DHT node")

    def exited_children(self) -> list[tuple[str, Path, int]]:
        """Return (name, log path, exit code) of children that are no longer running."""
        children = [(f"peer {peer.start}:{peer.end}", peer.log_path, peer.process) for peer in self.peers]
        if self.dht_process is not None and self.dht_log_path is not None:
            children.append(("DHT node", self.dht_log_path, self.dht_process))
        return [(name, path, process.returncode) for name, path, process in children if process.poll() is not None]


@contextlib.contextmanager
def local_swarm(
    model: str | None = None,
    spans: Sequence[tuple[int, int]] = DEFAULT_SPANS,
    log_dir: str | Path | None = None,
    *,
    runner_factory: str | None = None,
    extra_peer_args: Sequence[str] = (),
    dht_ready_timeout: float = DEFAULT_DHT_READY_TIMEOUT_S,
    peer_ready_timeout: float = DEFAULT_PEER_READY_TIMEOUT_S,
    dht_host: Host = LOOPBACK,
    peer_hosts: Sequence[Host] | None = None,
) -> Iterator[LocalSwarm]:
    """Start a DHT node and one peer per span, on 127.0.0.1 by default; stop them all on exit.

    Waits until every child is ready; raises `LaunchError` with the tail of the child's
    log if one exits or does not become ready in time. The processes stop when the block
    exits for any reason, including KeyboardInterrupt and SIGTERM of this process (SIGTERM
    is turned into KeyboardInterrupt while the block runs in the main thread). Children
    also get SIGTERM if the thread that started them dies (Linux PR_SET_PDEATHSIG).
    `runner_factory` ("module:attribute") and `extra_peer_args` are passed to every
    `swarmlens peer` command. `dht_host` and `peer_hosts` (one per span) place the
    processes on other hosts.
    """
    peer_hosts = list(peer_hosts) if peer_hosts is not None else [LOOPBACK] * len(spans)
    if len(peer_hosts) != len(spans):
        raise ValueError(f"got {len(peer_hosts)} peer hosts for {len(spans)} spans; pass one host per span")
    log_dir = Path(log_dir).resolve() if log_dir is not None else Path(tempfile.mkdtemp(prefix="swarmlens-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    if model is not None and Path(model).exists():
        # Children run in log_dir, so a relative checkpoint path must become absolute.
        model = str(Path(model).resolve())
    swarm = LocalSwarm(initial_peers=[], peers=[], log_dir=log_dir)

    atexit.register(swarm.stop)
    with _sigterm_as_keyboard_interrupt():
        try:
            _start_dht_node(swarm, dht_host, dht_ready_timeout)
            _start_peers(swarm, model, spans, peer_hosts, runner_factory, extra_peer_args, peer_ready_timeout)
            yield swarm
        finally:
            swarm.stop()
            atexit.unregister(swarm.stop)


def _start_dht_node(swarm: LocalSwarm, host: Host, timeout: float) -> None:
    log_path = swarm.log_dir / "dht.log"
    process = _spawn(["dht", "--host", host.address, *host.extra_args], log_path, host)
    swarm.dht_process, swarm.dht_log_path = process, log_path
    lines = _wait_for_marker(process, log_path, DHT_READY_MARKER, timeout, "DHT node")
    swarm.initial_peers = [line.split()[1] for line in lines]
    logger.info("DHT node (pid %d) is ready at %s", process.pid, " ".join(swarm.initial_peers))


def _start_peers(
    swarm: LocalSwarm,
    model: str | None,
    spans: Sequence[tuple[int, int]],
    hosts: Sequence[Host],
    runner_factory: str | None,
    extra_peer_args: Sequence[str],
    timeout: float,
) -> None:
    # Start all peers first and wait afterwards, so that they load their blocks in parallel.
    for index, ((start, end), host) in enumerate(zip(spans, hosts)):
        args = ["peer", "--blocks", f"{start}:{end}", "--host", host.address, "--initial-peers", *swarm.initial_peers]
        if model is not None:
            args += ["--model", model]
        if runner_factory is not None:
            args += ["--runner-factory", runner_factory]
        args += [*extra_peer_args, *host.extra_args]
        log_path = swarm.log_dir / f"peer-{index}-blocks-{start}-{end}.log"  # the index keeps replicas apart
        process = _spawn(args, log_path, host)
        # Registered now, so that stop() also ends peers that never become ready.
        swarm.peers.append(PeerProcess(process.pid, "", start, end, log_path, process))

    for peer in swarm.peers:
        name = f"peer {peer.start}:{peer.end}"
        lines = _wait_for_marker(peer.process, peer.log_path, PEER_READY_MARKER, timeout, name)
        fields = dict(item.split("=", 1) for item in lines[0].split()[1:] if "=" in item)
        peer.peer_id = fields.get("peer_id", "")
        logger.info("%s (pid %d, %s) is ready", name.capitalize(), peer.pid, peer.peer_id)


def _spawn(args: list[str], log_path: Path, host: Host = LOOPBACK) -> subprocess.Popen:
    """Start `python -m swarmlens *args` on `host` in a new session, with output to `log_path`.

    The child runs in the log folder: `python -m` puts the working directory first on
    sys.path, and a folder named `swarmlens` there would hide this package.
    """
    command = [*host.command_prefix, sys.executable, "-m", "swarmlens", *args]
    env = dict(os.environ)
    # Children import this very package even when it is not installed.
    package_root = str(Path(swarmlens.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    # All processes of a local swarm share this machine's cores. OpenMP's default spin-wait
    # after each parallel region keeps a peer's threads busy while the next peer computes;
    # passive waiting frees the cores. Measured once each on 2 cores with
    # benchmarks/generation_throughput.py: 10.4 -> 12.9 tokens/s through two peers.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log_path.parent,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    logger.debug("Started pid %d: %s (log %s)", process.pid, " ".join(command), log_path)
    return process


def _load_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up before any fork, so that the child only makes one foreign call.
_prctl = _load_prctl() if sys.platform == "linux" else None


def _die_with_parent() -> None:
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_for_marker(process: subprocess.Popen, log_path: Path, marker: str, timeout: float, name: str) -> list[str]:
    """Wait until the log of `process` has lines that start with `marker`; return them."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in _read_lines(log_path) if line.startswith(marker)]
        if lines:
            return lines
        if process.poll() is not None:
            raise LaunchError(
                f"{name} (pid {process.pid}) exited with code {process.returncode} before it was ready. "
                f"Last lines of {log_path}:\n{tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise LaunchError(
                f"{name} (pid {process.pid}) was not ready within {timeout:.0f} s. "
                f"Last lines of {log_path}:\n{tail(log_path)}"
            )
        time.sleep(POLL_INTERVAL_S)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def tail(path: Path, num_lines: int = LOG_TAIL_LINES) -> str:
    """Return the last `num_lines` lines of a log file, indented for error messages."""
    lines = _read_lines(path)[-num_lines:]
    return "\n".join("    " + line for line in lines) if lines else "    (empty)"


def _stop_process_group(process: subprocess.Popen, name: str) -> None:
    """SIGTERM the child, wait for it, then SIGKILL whatever is left of its process group."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) did not stop within %.0f s after SIGTERM; killing it", name, process.pid, STOP_TIMEOUT_S)
    # The group id is the child's pid (start_new_session). Killing the group also ends a
    # DHT process or p2pd that the child left behind.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(STOP_TIMEOUT_S)


@contextlib.contextmanager
def _sigterm_as_keyboard_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"received signal {signum}")

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM until the block ends, so that they do not cut cleanup short.

    The cleanup is what those signals ask for, so they are logged and not re-raised.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def log_signal(signum: int, frame: object) -> None:
        logger.info("Received signal %d while stopping the swarm; the stop continues", signum)

    previous = {signum: signal.signal(signum, log_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
