"""Tokens per second of generation through a loopback swarm against local Hugging Face `generate`.

Measures, in one run and on the default model: plain HF `generate` in this
process, then generation through a local swarm of two peers (blocks 0:15 and
15:30) without and with a steering edit at every step. Prints tokens per
second and the ratios swarm / local. Run: `python benchmarks/generation_throughput.py`.
"""

import argparse
import time

import torch

PROMPT = "Write a short story about a lighthouse keeper."
STEER_BLOCK = 20


def tokens_per_second(run, new_tokens: int, repeats: int) -> float:
    run()  # warm-up
    began = time.perf_counter()
    for _ in range(repeats):
        run()
    return new_tokens * repeats / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (default: 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (default: 3)")
    args = parser.parse_args()

    from swarmlens.checkpoint import load_reference_model, load_tokenizer, resolve_checkpoint
    from swarmlens.client import SwarmModel
    from swarmlens.launch import local_swarm

    path = resolve_checkpoint()
    tokenizer = load_tokenizer(path)
    hf_model = load_reference_model(path)
    encoded = tokenizer(PROMPT, return_tensors="pt")
    steer = 8 * torch.randn(hf_model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def hf_generate():
        with torch.no_grad():
            hf_model.generate(**encoded, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              do_sample=False, pad_token_id=tokenizer.eos_token_id)

    # Local first, while no peer process competes for the cores.
    local = tokens_per_second(hf_generate, args.new_tokens, args.repeats)
    print(f"local HF generate: {local:.1f} tokens/s")

    with local_swarm(str(path), spans=[(0, 15), (15, 30)]) as swarm:
        with SwarmModel.from_pretrained(str(path), initial_peers=swarm.initial_peers) as model:
            def plain():
                with model.generate(PROMPT, max_new_tokens=args.new_tokens, stop_tokens=[]):
                    pass

            def steered():
                with model.generate(PROMPT, max_new_tokens=args.new_tokens, stop_tokens=[]) as tracer:
                    with tracer.all():
                        model.model.layers[STEER_BLOCK].output[:, -1] += steer

            for name, run in (("swarm, plain", plain), ("swarm, steered every step", steered)):
                rate = tokens_per_second(run, args.new_tokens, args.repeats)
                print(f"{name}: {rate:.1f} tokens/s, {rate / local:.2f} x local HF generate")


if __name__ == "__main__":
    main()
