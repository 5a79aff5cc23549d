"""Forward latency and generation throughput of swarmlens against Petals 2.2.0, in one run.

Both swarms serve the same checkpoint folder with the same split: a DHT node and two peers
(Petals: servers) with blocks 0:15 and 15:30, float32 on CPU. The script measures

- the latency of one forward pass over a short prompt, through each swarm;
- greedy generation (tokens per second), through each swarm and with local Hugging Face
  `generate` as a common reference;

in alternating rounds, so that outside load affects both swarms alike, and prints medians
and the ratios swarmlens / Petals. Before timing it checks that both swarms return the
logits and the greedy tokens of the local model.

Everything runs inside a network namespace that has only loopback, which this script
creates and deletes (so it must run as root): the Petals processes, the swarmlens swarm
and both clients. Petals runs with the Python of benchmarks/.venv-petals (made by
benchmarks/setup_petals.sh) through benchmarks/petals_worker.py; swarmlens runs here.

Run: `python benchmarks/petals_comparison.py` (--repeats N --new-tokens N --model FOLDER).
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
PETALS_PYTHON = BENCHMARKS / ".venv-petals" / "bin" / "python"
PETALS_WORKER = BENCHMARKS / "petals_worker.py"
FORWARD_PROMPT = "The capital of France is"
# Greedy decoding continues this prompt past 32 tokens without an end-of-sequence token, so
# `min_new_tokens` (HF, Petals) and `stop_tokens=[]` (swarmlens) yield the same tokens.
GENERATE_PROMPT = "Once upon a time, a lighthouse keeper named"
SPANS = [(0, 15), (15, 30)]
DHT_PREFIX = "swarmlens-bench"
READY_TIMEOUT = 180.0
STOP_TIMEOUT = 10.0
CLEANUP_TIMEOUT = 90.0  # an estimate of the time the inner run needs to stop both swarms
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# --- the namespace -----------------------------------------------------------


def run_in_private_namespace(argv: list[str]) -> int:
    """Run this script again inside a new loopback-only network namespace, then delete the namespace."""
    if os.geteuid() != 0:
        sys.exit("error: this benchmark creates a network namespace and must run as root.")
    if shutil.which("ip") is None:
        sys.exit("error: the `ip` command is missing. Install iproute2, which provides it.")
    name = f"swarmlens-bench-{os.getpid()}"
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)  # so that the namespace is deleted on SIGTERM too
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        command = ["ip", "netns", "exec", name, sys.executable, str(Path(__file__).resolve()), *argv, "--in-namespace"]
        inner = subprocess.Popen(command)
        try:
            return inner.wait()
        except KeyboardInterrupt:
            # Let the inner run stop its swarms itself. Whatever is left is killed below.
            inner.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                inner.wait(timeout=CLEANUP_TIMEOUT)
            raise
    finally:
        kill_namespace_processes(name)
        subprocess.run(["ip", "netns", "delete", name], check=False)


def raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def kill_namespace_processes(name: str) -> None:
    """Kill the processes left in namespace `name`. Only processes of this run can be there."""
    listing = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
    for pid in listing.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def require_loopback_only() -> None:
    interfaces = sorted(os.listdir("/sys/class/net"))
    if interfaces != ["lo"]:
        sys.exit(f"error: expected a loopback-only network namespace, found interfaces {interfaces}.")


# --- processes ---------------------------------------------------------------


def spawn(command: list[str], log_path: Path, env: dict[str, str], **popen_args) -> subprocess.Popen:
    """Start `command` in its own process group, with stderr (and stdout unless piped) to `log_path`."""
    log = open(log_path, "wb")
    popen_args.setdefault("stdout", log)
    return subprocess.Popen(command, stderr=log, env=env, start_new_session=True, **popen_args)


def stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM the process groups of `processes`, then SIGKILL the groups still there after STOP_TIMEOUT."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        if all(group_is_gone(process.pid) for process in processes):
            return


def group_is_gone(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return True
    return False


def wait_for_marker(process: subprocess.Popen, log_path: Path, name: str) -> dict:
    """Return the JSON fields of the first "PETALS_WORKER {...}" line of `log_path`."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("PETALS_WORKER "):
                return json.loads(line.split(" ", 1)[1])
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode}:\n{tail(log_path)}")
        time.sleep(0.2)
    raise RuntimeError(f"{name} was not ready after {READY_TIMEOUT:.0f} s:\n{tail(log_path)}")


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- Petals ------------------------------------------------------------------


class PetalsClient:
    """The Petals client process: one JSON request per line in, one JSON response per line out."""

    def __init__(self, process: subprocess.Popen, log_path: Path):
        self.process, self.log_path = process, log_path

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the Petals client exited:\n{tail(self.log_path)}")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=STOP_TIMEOUT)
        stop([self.process])


@contextlib.contextmanager
def petals_swarm(checkpoint: Path, workdir: Path):
    """Start a Petals DHT node, one server per span and a client, and yield the client."""
    sys.path.insert(0, str(BENCHMARKS))
    import petals_compat

    model = petals_compat.write_petals_checkpoint(checkpoint, workdir / "petals-checkpoint")
    (workdir / "petals-cache").mkdir(exist_ok=True)
    server_env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}  # as swarmlens peers
    worker = [str(PETALS_PYTHON), str(PETALS_WORKER)]
    processes = []
    try:
        dht_log = workdir / "petals-dht.log"
        processes.append(spawn([*worker, "dht"], dht_log, server_env))
        initial_peers = wait_for_marker(processes[-1], dht_log, "the Petals DHT node")["initial_peers"]
        common = ["--model", str(model), "--initial-peers", *initial_peers, "--dht-prefix", DHT_PREFIX]
        servers = []
        for start, end in SPANS:
            log = workdir / f"petals-server-{start}-{end}.log"
            processes.append(spawn([*worker, "server", "--blocks", f"{start}:{end}", "--cache-dir",
                                    str(workdir / "petals-cache"), *common], log, server_env))
            servers.append((processes[-1], log, f"the Petals server of blocks {start}:{end}"))
        for process, log, name in servers:
            wait_for_marker(process, log, name)
        client_log = workdir / "petals-client.log"
        client_process = spawn([*worker, "client", *common], client_log, dict(os.environ),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        processes.append(client_process)
        client = PetalsClient(client_process, client_log)
        try:
            yield client
        finally:
            client.close()
    finally:
        stop(processes)


# --- measuring ---------------------------------------------------------------


def timed(function) -> float:
    began = time.perf_counter()
    function()
    return time.perf_counter() - began


def hf_reference(hf_model, tokenizer, new_tokens: int):
    """Return (last-position logits of the forward prompt, greedy tokens of the generation prompt)."""
    import torch

    with torch.no_grad():
        logits = hf_model(**tokenizer(FORWARD_PROMPT, return_tensors="pt")).logits[0, -1]
        tokens = hf_generate(hf_model, tokenizer, new_tokens)
    return logits, tokens


def hf_generate(hf_model, tokenizer, new_tokens: int) -> list[int]:
    encoded = tokenizer(GENERATE_PROMPT, return_tensors="pt")
    output = hf_model.generate(**encoded, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id)
    return output[0].tolist()


def swarmlens_forward(model):
    with model.trace(FORWARD_PROMPT) as tracer:
        pass
    return tracer.logits[0, -1]


def swarmlens_generate(model, new_tokens: int) -> list[int]:
    with model.generate(GENERATE_PROMPT, max_new_tokens=new_tokens, stop_tokens=[]) as tracer:
        pass
    return tracer.output[0].tolist()


def check_correctness(reference, petals: PetalsClient, model, tokenizer, new_tokens: int) -> bool:
    """Compare both swarms with the local model, print the result and return whether all tokens match."""
    import torch

    ref_logits, ref_tokens = reference
    forward_ids = tokenizer(FORWARD_PROMPT)["input_ids"]
    generate_ids = tokenizer(GENERATE_PROMPT)["input_ids"]
    petals_forward = petals.ask(op="forward", input_ids=forward_ids, return_last_logits=True)
    petals_logits = torch.tensor(petals_forward["last_logits"])
    petals_tokens = petals.ask(op="generate", input_ids=generate_ids, new_tokens=new_tokens)["tokens"]
    results = {
        "Petals": (petals_logits, petals_tokens),
        "swarmlens": (swarmlens_forward(model), swarmlens_generate(model, new_tokens)),
    }
    print(f"reference: local HF, {new_tokens} greedy tokens: {tokenizer.decode(ref_tokens[len(generate_ids):])!r}")
    if tokenizer.eos_token_id in ref_tokens[len(generate_ids):]:
        print("warning: the reference reaches the end-of-sequence token, which `min_new_tokens` suppresses and "
              "`stop_tokens=[]` does not; the token comparison below is not meaningful for this prompt")
    all_match = True
    for name, (logits, tokens) in results.items():
        difference = (logits.float() - ref_logits.float()).abs().max().item()
        same_tokens = tokens == ref_tokens
        first_diff = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
        status = "match"
        if not same_tokens:
            status = f"DIFFER (first at position {first_diff}, lengths {len(tokens)}/{len(ref_tokens)})"
        print(f"{name:<10} last-token logits max |diff| vs HF: {difference:.2e}; greedy tokens vs HF: {status}")
        all_match = all_match and same_tokens
    return all_match


def measure_forward(petals: PetalsClient, model, tokenizer, repeats: int) -> dict[str, list[float]]:
    """Alternate one Petals and one swarmlens forward pass per round, and return the seconds of each."""
    input_ids = tokenizer(FORWARD_PROMPT)["input_ids"]
    times = {"Petals": [], "swarmlens": []}
    for _ in range(repeats):
        times["Petals"].append(petals.ask(op="forward", input_ids=input_ids)["seconds"])
        times["swarmlens"].append(timed(lambda: swarmlens_forward(model)))
    return times


def measure_hf_generation(hf_model, tokenizer, new_tokens: int, repeats: int) -> list[float]:
    """Return the tokens per second of local HF `generate`, one value per run."""
    import torch

    with torch.no_grad():
        return [new_tokens / timed(lambda: hf_generate(hf_model, tokenizer, new_tokens)) for _ in range(repeats)]


def measure_generation(petals: PetalsClient, model, tokenizer, new_tokens: int, repeats: int) -> dict[str, list[float]]:
    """Alternate one Petals and one swarmlens generation per round, and return the tokens per second of each run."""
    input_ids = tokenizer(GENERATE_PROMPT)["input_ids"]
    rates = {"Petals": [], "swarmlens": []}
    for _ in range(repeats):
        response = petals.ask(op="generate", input_ids=input_ids, new_tokens=new_tokens)
        rates["Petals"].append(new_tokens / response["seconds"])
        rates["swarmlens"].append(new_tokens / timed(lambda: swarmlens_generate(model, new_tokens)))
    return rates


def report(forward_times: dict, rates: dict, args: argparse.Namespace) -> None:
    petals_ms = statistics.median(forward_times["Petals"]) * 1000
    swarmlens_ms = statistics.median(forward_times["swarmlens"]) * 1000
    print(f"\nforward pass over {FORWARD_PROMPT!r}, median of {args.repeats} (lower is better)")
    print(f"  Petals    {petals_ms:8.1f} ms")
    print(f"  swarmlens {swarmlens_ms:8.1f} ms   swarmlens / Petals = {swarmlens_ms / petals_ms:.2f}")

    medians = {name: statistics.median(values) for name, values in rates.items()}
    hf = medians["local HF generate"]
    print(f"\ngreedy generation, {args.new_tokens} new tokens, median of {args.generate_repeats} (higher is better)")
    for name, rate in medians.items():
        print(f"  {name:<18} {rate:7.1f} tokens/s   {rate / hf:.2f} x local HF")
    print(f"  swarmlens / Petals = {medians['swarmlens'] / medians['Petals']:.2f}")


def load_average() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def run_benchmark(args: argparse.Namespace) -> None:
    require_loopback_only()
    sys.stdout.reconfigure(line_buffering=True)  # show progress when the output goes to a file
    os.environ.update(OFFLINE_ENV)
    from swarmlens.checkpoint import load_reference_model, load_tokenizer, resolve_checkpoint
    from swarmlens.client import SwarmModel
    from swarmlens.launch import local_swarm

    print(f"load average at start (1, 5, 15 min): {load_average()}")
    checkpoint = resolve_checkpoint(args.model)
    tokenizer = load_tokenizer(checkpoint)
    hf_model = load_reference_model(checkpoint)
    reference = hf_reference(hf_model, tokenizer, args.new_tokens)
    # Local first, while no swarm process competes for the cores (as in generation_throughput.py).
    hf_rates = measure_hf_generation(hf_model, tokenizer, args.new_tokens, args.generate_repeats)

    with tempfile.TemporaryDirectory(prefix="swarmlens-petals-") as workdir:
        began = time.perf_counter()
        with petals_swarm(checkpoint, Path(workdir)) as petals:
            print(f"Petals swarm ready in {time.perf_counter() - began:.1f} s")
            began = time.perf_counter()
            with local_swarm(str(checkpoint), spans=SPANS) as swarm, \
                    SwarmModel.from_pretrained(str(checkpoint), initial_peers=swarm.initial_peers) as model:
                print(f"swarmlens swarm ready in {time.perf_counter() - began:.1f} s")
                matched = check_correctness(reference, petals, model, tokenizer, args.new_tokens)
                forward_times = measure_forward(petals, model, tokenizer, args.repeats)
                rates = {"local HF generate": hf_rates,
                         **measure_generation(petals, model, tokenizer, args.new_tokens, args.generate_repeats)}
    report(forward_times, rates, args)
    print(f"\ngreedy tokens of both swarms match local HF: {'yes' if matched else 'NO'}")
    print(f"load average at end (1, 5, 15 min): {load_average()}")


def check_petals_venv() -> None:
    if not PETALS_PYTHON.exists():
        sys.exit(f"error: {PETALS_PYTHON} not found; run `bash benchmarks/setup_petals.sh` first.")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed forward passes per swarm (default: 20)")
    parser.add_argument("--generate-repeats", type=int, default=5, help="timed generations per case (default: 5)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (default: 32)")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the converted default model)")
    parser.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.in_namespace:
        run_benchmark(args)
        return
    check_petals_venv()
    sys.exit(run_in_private_namespace(sys.argv[1:]))


if __name__ == "__main__":
    main()
