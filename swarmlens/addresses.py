"""Checks of the addresses and ports that nodes listen on and announce.

This module imports nothing heavy, so that the command line can check its options before
it imports hivemind.
"""

import ipaddress
import socket


class PortInUseError(OSError):
    """The fixed port a node should listen on is taken by another process."""


def check_ipv4(address: str, option: str = "host") -> str:
    """Return `address` if it is an IPv4 address, else raise ValueError naming `option`.

    An invalid address would otherwise fail inside hivemind's DHT process, whose error
    does not reach the caller, and leave the caller waiting forever.
    """
    try:
        return str(ipaddress.IPv4Address(address))
    except ValueError:
        raise ValueError(
            f"invalid {option} {address!r}: expected an IPv4 address such as 203.0.113.5 "
            "(IPv6 addresses and host names are not supported)"
        ) from None


def check_port(port: int) -> int:
    """Return `port` if it is a TCP port number or 0 (any free port), else raise ValueError."""
    if not 0 <= port <= 65535:
        raise ValueError(f"invalid port {port}: expected 0 (any free port) to 65535")
    return port


def check_port_free(host: str, port: int) -> None:
    """Raise PortInUseError if `host:port` cannot be bound now.

    p2pd binds with SO_REUSEPORT, so a second node on a taken port would start and share
    it with the first, and the kernel would hand each connection to either of them.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise PortInUseError(
                error.errno, f"port {port} on {host} is in use ({error.strerror}); pick another --port "
                "or stop the process that uses it"
            ) from None
