"""Checks of listen and announce addresses and ports (only a loopback socket, no hivemind)."""

import socket

import pytest

from swarmlens.addresses import PortInUseError, check_ipv4, check_port, check_port_free
from swarmlens.swarm import loopback_dht_kwargs


@pytest.mark.parametrize("address", ["::1", "example.com", "999.1.1.1", "", "10.0.0"])
def test_non_ipv4_address_rejected(address):
    with pytest.raises(ValueError, match="expected an IPv4 address"):
        check_ipv4(address)


def test_ipv4_address_accepted():
    assert check_ipv4("203.0.113.5") == "203.0.113.5"


@pytest.mark.parametrize("port", [-5, 65536, 70000])
def test_port_out_of_range_rejected(port):
    with pytest.raises(ValueError, match="expected 0 \\(any free port\\) to 65535"):
        check_port(port)


def test_taken_port_detected():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        with pytest.raises(PortInUseError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port_free("127.0.0.1", port)


def test_free_port_passes():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    check_port_free("127.0.0.1", port)


def test_dht_kwargs_reject_bad_announce_host():
    with pytest.raises(ValueError, match="invalid announce host '::1'"):
        loopback_dht_kwargs("127.0.0.1", 31337, announce_host="::1")
