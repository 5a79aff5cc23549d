"""Argument parsing of the `swarmlens` command line: no network."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from swarmlens.cli import build_parser, main, parse_span


def test_parse_span_valid():
    assert parse_span("0:15") == (0, 15)


@pytest.mark.parametrize("text", ["15", "15:15", "20:10", "-1:3", "a:b", "0:", ""])
def test_parse_span_invalid(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected START:END"):
        parse_span(text)


def test_up_default_spans():
    args = build_parser().parse_args(["up"])

    assert args.peers == [(0, 15), (15, 30)]
    assert args.model == "default"


def test_peer_requires_initial_peers():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["peer", "--blocks", "0:15"])


def test_peer_options_parsed():
    args = build_parser().parse_args(
        ["peer", "--blocks", "3:9", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/x", "--request-timeout", "5"]
    )

    assert args.blocks == (3, 9)
    assert args.initial_peers == ["/ip4/127.0.0.1/tcp/1/p2p/x"]
    assert args.request_timeout == 5.0


def test_module_entry_point_prints_help():
    result = subprocess.run([sys.executable, "-m", "swarmlens", "--help"], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0
    for command in ("dht", "peer", "up", "status", "demo"):
        assert command in result.stdout


def test_announce_host_requires_port(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["dht", "--announce-host", "203.0.113.5"])

    assert exit_info.value.code == 2
    assert "--announce-host needs a fixed --port" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["dht", "--host", "example.com"], "invalid address 'example.com'"),
    (["dht", "--announce-host", "::1", "--port", "31337"], "invalid address '::1'"),
    (["dht", "--port", "-5"], "invalid port '-5'"),
    (["dht", "--port", "70000"], "invalid port '70000'"),
    (["peer", "--blocks", "0:3", "--initial-peers", "x", "--max-buffered-request-bytes", "10"],
     "--max-buffered-request-bytes must be at least --max-request-bytes"),
])
def test_invalid_listen_options_rejected(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
