"""Latency of one traced forward through a loopback swarm against the same forward locally.

Starts a local swarm (a DHT node and two peers, blocks 0:15 and 15:30 of the
default model), then times each case several times through the swarm, through
the local executor and as a plain Hugging Face forward, all in this run, and
prints medians and their ratios. Run: `python benchmarks/forward_latency.py`.
"""

import argparse
import statistics
import time

import torch

PROMPT = "The capital of France is"


def cases(model):
    """Return (name, study) pairs; each study traces one forward on `model`."""

    def empty():
        with model.trace(PROMPT):
            pass

    def logit_lens():
        with model.trace(PROMPT):
            for block in model.model.layers:
                model.lm_head(model.model.norm(block.output[:, -1])).save()

    def cross_block_patch():
        with model.trace(PROMPT):
            model.model.layers[25].output[:, -1] += model.model.layers[5].output[:, -1]

    return [("empty trace", empty), ("logit lens, 30 saves", logit_lens), ("cross-block patch", cross_block_patch)]


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per case (default: 10)")
    args = parser.parse_args()

    from swarmlens.checkpoint import load_reference_model, load_tokenizer, resolve_checkpoint
    from swarmlens.client import SwarmModel
    from swarmlens.intervene import LocalModel
    from swarmlens.launch import local_swarm

    path = resolve_checkpoint()
    tokenizer = load_tokenizer(path)
    hf_model = load_reference_model(path)
    local = LocalModel(hf_model, tokenizer)
    encoded = tokenizer(PROMPT, return_tensors="pt")

    def plain_forward():
        with torch.no_grad():
            hf_model(**encoded)

    # Local numbers first, while no peer process competes for the two cores.
    plain = median_seconds(plain_forward, args.repeats)
    print(f"plain Hugging Face forward: {plain * 1000:.1f} ms (median of {args.repeats})")
    local_times = {name: median_seconds(study, args.repeats) for name, study in cases(local)}

    began = time.perf_counter()
    with local_swarm(str(path), spans=[(0, 15), (15, 30)]) as swarm:
        print(f"local swarm ready in {time.perf_counter() - began:.1f} s")
        with SwarmModel.from_pretrained(str(path), initial_peers=swarm.initial_peers) as remote:
            print(f"{'case':<24} {'swarm ms':>9} {'local ms':>9} {'swarm/local':>12} {'swarm/plain':>12}")
            for name, study in cases(remote):
                remote_s = median_seconds(study, args.repeats)
                local_s = local_times[name]
                print(f"{name:<24} {remote_s * 1000:9.1f} {local_s * 1000:9.1f} {remote_s / local_s:12.2f} "
                      f"{remote_s / plain:12.2f}")

if __name__ == "__main__":
    main()
