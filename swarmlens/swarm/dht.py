"""Start hivemind DHT nodes that stay on the addresses they are given."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any, Iterator, Sequence

import hivemind

from swarmlens.addresses import check_ipv4, check_port, check_port_free

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"


def loopback_dht_kwargs(host: str = DEFAULT_HOST, port: int = 0, announce_host: str | None = None) -> dict[str, Any]:
    """Return `hivemind.DHT` keyword arguments that keep a node off the wider network.

    The node listens on `host:port` only (port 0 picks a free port). With `announce_host`,
    it announces `announce_host:port` in place of its listen addresses, which suits a
    machine behind a port forward or one that listens on 0.0.0.0. `port` must then be set. hivemind 1.1.12 defaults
    would make its p2pd daemon send NAT-PMP/UPnP packets to the gateway (`nat_port_map`),
    probe reachability through other peers (`auto_nat`), use circuit relays (`use_relay`,
    `use_auto_relay`) and bootstrap from public IPFS nodes (`use_ipfs`), so all of them are
    switched off. A deployment on a real network passes its public address as `host`.
    """
    check_ipv4(host)
    check_port(port)
    kwargs: dict[str, Any] = {
        "host_maddrs": [f"/ip4/{host}/tcp/{port}"],
        "nat_port_map": False,
        "use_relay": False,
        "use_auto_relay": False,
        "auto_nat": False,
        "use_ipfs": False,
    }
    if announce_host is not None:
        check_ipv4(announce_host, "announce host")
        if port == 0:
            raise ValueError(
                f"cannot announce {announce_host} without a fixed port: pass a port (--port) "
                "that other machines can reach"
            )
        kwargs["announce_maddrs"] = [f"/ip4/{announce_host}/tcp/{port}"]
    return kwargs


def start_dht(
    initial_peers: Sequence[str] = (),
    host: str = DEFAULT_HOST,
    port: int = 0,
    client_mode: bool = False,
    announce_host: str | None = None,
) -> hivemind.DHT:
    """Start a DHT node in a background process and wait until it is ready.

    Without `initial_peers` the node starts a new swarm. A node in `client_mode` can store and
    read records but does not serve DHT requests of other nodes, which fits processes that
    only look peers up. Raises whatever hivemind raises when the node cannot start or join,
    for example when no initial peer answers. `announce_host` is described in
    `loopback_dht_kwargs`.
    """
    kwargs = loopback_dht_kwargs(host, port, announce_host)
    if port != 0:
        check_port_free(host, port)
    started_at = time.perf_counter()
    with _default_signal_handlers():
        dht = hivemind.DHT(
            initial_peers=list(initial_peers) or None,
            start=True,
            client_mode=client_mode,
            **kwargs,
        )
    elapsed_ms = (time.perf_counter() - started_at) * 1000
    logger.debug("DHT node started in %.0f ms (client_mode=%s)", elapsed_ms, client_mode)
    return dht


def stop_dht(dht: hivemind.DHT, timeout: float = 10.0) -> None:
    """Shut the DHT node down; kill its process if it is still alive after `timeout` seconds.

    hivemind's own shutdown sends SIGTERM as its last resort, which a process with a
    SIGTERM handler may not act on, and the interpreter then waits for it at exit.
    """
    dht.shutdown()
    dht.join(timeout)
    if dht.is_alive():
        logger.warning("The DHT process (pid %s) did not stop within %.0f s; killing it", dht.pid, timeout)
        dht.kill()
        dht.join(timeout)


@contextlib.contextmanager
def _default_signal_handlers() -> Iterator[None]:
    """Let the DHT process start with Python's default SIGTERM and SIGINT handling.

    hivemind forks the DHT process, which would otherwise inherit the handlers of the
    caller, such as one that only sets a stop flag, and then ignore the SIGTERM with which
    hivemind stops it as a last resort.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_DFL),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """Return the multiaddrs (with /p2p/<peer id>) that other nodes can use as initial peers."""
    return [str(maddr) for maddr in dht.get_visible_maddrs()]
