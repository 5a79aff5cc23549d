"""A client that runs one study on a swarm and writes the results to a file.

tests/test_multi_host.py starts it on a test host of its own, so that it reaches the peers
only through the network. The same `run_study` gives the reference on the local executor.

    python tests/multi_host_client.py --checkpoint DIR --out FILE --initial-peers MADDR ...
"""

from __future__ import annotations

import argparse

import torch

PROMPT = "The capital of France is"
EARLY_BLOCK, LATE_BLOCK = 3, 20
NEW_TOKENS = 6


def run_study(model) -> dict:
    """Run a cross-block patch and a short greedy generation on `model`."""
    with model.trace(PROMPT) as tracer:
        early = model.model.layers[EARLY_BLOCK].output[:, -1]
        late = model.model.layers[LATE_BLOCK].output
        late[:, -1] = late[:, -1] + early
        patched = model.model.layers[LATE_BLOCK].output.save()

    with model.generate(PROMPT, max_new_tokens=NEW_TOKENS) as generation:
        pass

    return {
        "logits": tracer.logits,
        "patched": patched.value,
        "tokens": generation.output,
        "early_node": early.node,
        "hop_peer_ids": [hop["peer_id"] for hop in tracer.result.hops],
        "sent_values": tracer.result.transfer.get("sent_values", []),
        "received_values": tracer.result.transfer.get("received_values", []),
    }


def main() -> None:
    from swarmlens.client import SwarmModel

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--initial-peers", nargs="+", required=True)
    args = parser.parse_args()

    with SwarmModel.from_pretrained(args.checkpoint, initial_peers=args.initial_peers) as model:
        torch.save(run_study(model), args.out)


if __name__ == "__main__":
    main()
