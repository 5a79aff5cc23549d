"""The Petals side of benchmarks/petals_comparison.py; runs with the Python of benchmarks/.venv-petals.

Three roles, one per process, all started by petals_comparison.py inside its loopback-only
network namespace:

    petals_worker.py dht                        a DHT node that starts a new private swarm
    petals_worker.py server --blocks 0:15 ...   a Petals server for one span of blocks
    petals_worker.py client ...                 a Petals client that runs timed requests

`dht` and `server` print one line "PETALS_WORKER {json}" when they are ready and run until
SIGTERM. `client` reads one JSON request per line on stdin and writes one JSON response per
line on stdout. Everything else it prints goes to stderr.

Every process turns off what would reach outside the machine: no public initial peers,
no relays, no AutoNAT, no NAT port mapping, no reachability check, a fixed throughput
instead of a speed test, listening on 127.0.0.1 only. It also refuses to start when its
network namespace has any interface but loopback.
"""

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

MARKER = "PETALS_WORKER"
LOOPBACK_MADDRS = ["/ip4/127.0.0.1/tcp/0"]
# Options of hivemind's P2P daemon that would dial out or open ports on a gateway.
P2P_OFFLINE_OPTIONS = {"use_relay": False, "use_auto_relay": False, "auto_nat": False, "nat_port_map": False}
FIXED_THROUGHPUT = 1.0  # announced requests per second: a number, so Petals runs no speed test


def require_loopback_only() -> None:
    interfaces = sorted(os.listdir("/sys/class/net"))
    if interfaces != ["lo"]:
        sys.exit(f"error: this Petals process must run in a loopback-only network namespace, found {interfaces}; "
                 "start it through benchmarks/petals_comparison.py")


def import_petals():
    """Apply the compatibility shims, then import Petals (which imports hivemind)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import petals_compat

    petals_compat.apply()
    import petals

    return petals


def announce(**fields) -> None:
    print(f"{MARKER} {json.dumps(fields)}", flush=True)


def sigterm_as_keyboard_interrupt() -> None:
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def run_dht(args: argparse.Namespace) -> None:
    import_petals()
    import hivemind

    dht = hivemind.DHT(initial_peers=[], start=True, host_maddrs=LOOPBACK_MADDRS, **P2P_OFFLINE_OPTIONS)
    announce(initial_peers=[str(address) for address in dht.get_visible_maddrs()])
    sigterm_as_keyboard_interrupt()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        dht.shutdown()


def run_server(args: argparse.Namespace) -> None:
    import_petals()
    from petals.server.server import Server
    from petals.utils.convert_block import QuantType

    server = Server(
        converted_model_name_or_path=args.model,
        initial_peers=args.initial_peers,
        dht_prefix=args.dht_prefix,
        block_indices=args.blocks,
        throughput=FIXED_THROUGHPUT,
        torch_dtype="float32",
        quant_type=QuantType.NONE,
        device="cpu",
        cache_dir=args.cache_dir,
        skip_reachability_check=True,
        reachable_via_relay=False,  # known, so Petals skips its own reachability probe
        host_maddrs=LOOPBACK_MADDRS,
        **P2P_OFFLINE_OPTIONS,
    )
    threading.Thread(target=announce_when_ready, args=(server,), daemon=True).start()
    sigterm_as_keyboard_interrupt()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()


def announce_when_ready(server) -> None:
    while server.module_container is None or not server.module_container.ready.is_set():
        time.sleep(0.1)
    announce(blocks=sorted(server.module_container.module_backends))


def keep_client_dht_offline() -> None:
    """Make the DHT that Petals' client creates for itself use the offline P2P options too."""
    import hivemind
    from petals.client.routing import sequence_manager

    class OfflineDHT(hivemind.DHT):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("host_maddrs", LOOPBACK_MADDRS)
            super().__init__(*args, **{**kwargs, **P2P_OFFLINE_OPTIONS})

    sequence_manager.DHT = OfflineDHT


def run_client(args: argparse.Namespace) -> None:
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # keep library output out of the responses

    import_petals()
    import torch
    from petals import AutoDistributedModelForCausalLM

    keep_client_dht_offline()
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=args.initial_peers, dht_prefix=args.dht_prefix, torch_dtype=torch.float32,
        show_route=False,
    )
    model.eval()
    handlers = {"forward": forward, "generate": generate}
    for line in sys.stdin:
        request = json.loads(line)
        with torch.inference_mode():
            response = handlers[request["op"]](model, request)
        protocol.write(json.dumps(response) + "\n")
        protocol.flush()
    # End of input: stop the client's DHT and exit at once, because Petals' background
    # threads would keep the process alive.
    sequence_manager = model.transformer.h.sequence_manager
    sequence_manager.shutdown()
    sequence_manager.dht.shutdown()
    protocol.close()
    os._exit(0)


def forward(model, request: dict) -> dict:
    import torch

    input_ids = torch.tensor([request["input_ids"]])
    began = time.perf_counter()
    logits = model(input_ids).logits
    seconds = time.perf_counter() - began
    response = {"seconds": seconds}
    if request.get("return_last_logits"):
        response["last_logits"] = logits[0, -1].tolist()
    return response


def generate(model, request: dict) -> dict:
    import torch

    input_ids = torch.tensor([request["input_ids"]])
    new_tokens = request["new_tokens"]
    began = time.perf_counter()
    output = model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "tokens": output[0].tolist()}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    roles = parser.add_subparsers(dest="role", required=True)
    roles.add_parser("dht", help="start a DHT node for a new private swarm")
    for role in ("server", "client"):
        sub = roles.add_parser(role)
        sub.add_argument("--model", required=True, help="Petals-readable checkpoint folder")
        sub.add_argument("--initial-peers", nargs="+", required=True)
        sub.add_argument("--dht-prefix", required=True)
    server = roles.choices["server"]
    server.add_argument("--blocks", required=True, help="start:end, e.g. 0:15")
    server.add_argument("--cache-dir", required=True,
                        help="Petals' cache folder (it gets lock files only, because nothing is downloaded)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    require_loopback_only()
    {"dht": run_dht, "server": run_server, "client": run_client}[args.role](args)


if __name__ == "__main__":
    main()
