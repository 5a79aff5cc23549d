"""Test hosts in Linux network namespaces, joined by one bridge on a private subnet.

Each host has its own loopback and one interface with an address of SUBNET, so a process
on one host reaches another host only through the addresses that the swarm announces.
Creating namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2's `ip`.
Nothing here touches the network of the machine itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from typing import Iterator

from swarmlens.launch import Host

SUBNET = "10.231.0"
PREFIX_LENGTH = 24


class NamespaceUnavailableError(RuntimeError):
    """The error raised when this machine or user cannot create network namespaces."""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NamespaceUnavailableError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


def _kill_namespace_processes(namespace: str) -> None:
    result = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30)
    for pid in result.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def namespace_hosts(count: int) -> Iterator[list[Host]]:
    """Create `count` hosts with addresses SUBNET.1, SUBNET.2, ...; delete them on exit.

    Raises NamespaceUnavailableError when namespaces cannot be created here.
    """
    if shutil.which("ip") is None:
        raise NamespaceUnavailableError("iproute2's `ip` command is not installed")
    if os.geteuid() != 0:
        raise NamespaceUnavailableError("creating network namespaces needs root")

    # The pid in the names keeps concurrent test runs apart.
    bridge = f"swarmlens-{os.getpid()}-bridge"
    hosts = [f"swarmlens-{os.getpid()}-host{index}" for index in range(1, count + 1)]
    created: list[str] = []
    try:
        _ip("netns", "add", bridge)
        created.append(bridge)
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge, "link", "set", "br0", "up")

        for index, host in enumerate(hosts, start=1):
            _ip("netns", "add", host)
            created.append(host)
            _ip("-n", bridge, "link", "add", f"veth{index}", "type", "veth", "peer", "name", "eth0", "netns", host)
            _ip("-n", bridge, "link", "set", f"veth{index}", "master", "br0", "up")
            _ip("-n", host, "addr", "add", f"{SUBNET}.{index}/{PREFIX_LENGTH}", "dev", "eth0")
            _ip("-n", host, "link", "set", "eth0", "up")
            _ip("-n", host, "link", "set", "lo", "up")

        yield [
            Host(f"{SUBNET}.{index}", ("ip", "netns", "exec", host))
            for index, host in enumerate(hosts, start=1)
        ]
    finally:
        for namespace in reversed(created):
            _kill_namespace_processes(namespace)
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, timeout=30)
