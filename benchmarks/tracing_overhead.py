"""Tracing overhead of swarmlens' local executor against NNsight 0.8 and a plain Hugging Face forward.

Loads the same local checkpoint folder twice in one process, once for
`swarmlens.intervene.LocalModel` and once for `nnsight.TransformersModel`.
Then it times four cases on the same prompt: an empty trace, one save (the
output of the middle block), 30 saves (every block output) and 30 edits
(every block output scaled in place). The cases, both tracers and a plain forward run in
alternation, one call each per round, so that load from other processes on
the machine affects every column alike. Prints medians and the ratios
swarmlens / NNsight and each tracer / plain forward. Before timing, it checks
that both tracers return the same saved values and logits.

NNsight is a benchmark-only dependency: create its virtual environment with
`bash benchmarks/setup_nnsight.sh`, then run
`python benchmarks/tracing_overhead.py` from any environment. Without nnsight
importable, the script starts itself again with benchmarks/.venv-nnsight.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# Nothing may come from a model hub: both tracers load the local folder only.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

NNSIGHT_VENV = Path(__file__).resolve().parent / ".venv-nnsight"
PROMPT = "The capital of France is"
SAVED_BLOCK = 15
SCALE = 0.5


def ensure_nnsight() -> None:
    """Start this script again with the NNsight venv's Python when nnsight is not importable here."""
    try:
        import nnsight  # noqa: F401
        return
    except ImportError:
        pass
    python = NNSIGHT_VENV / "bin" / "python"
    if not python.exists():
        sys.exit(f"error: nnsight is not importable and {python} does not exist; "
                 "run `bash benchmarks/setup_nnsight.sh` first.")
    if Path(sys.executable).absolute() == python.absolute():
        sys.exit(f"error: nnsight is not importable in {NNSIGHT_VENV}; run `bash benchmarks/setup_nnsight.sh` again.")
    print(f"nnsight is not importable here; running with {python}", flush=True)
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


def swarmlens_cases(model):
    """Return {case: study} for swarmlens. Each study runs one trace and returns (saved values, logits)."""
    layers = model.model.layers

    def empty():
        with model.trace(PROMPT) as tracer:
            pass
        return [], tracer.logits

    def one_save():
        with model.trace(PROMPT) as tracer:
            hidden = layers[SAVED_BLOCK].output.save()
        return [hidden.value], tracer.logits

    def all_saves():
        with model.trace(PROMPT) as tracer:
            hidden = [block.output.save() for block in layers]
        return [proxy.value for proxy in hidden], tracer.logits

    def all_edits():
        with model.trace(PROMPT) as tracer:
            for block in layers:
                block.output[:] = block.output * SCALE
        return [], tracer.logits

    return {"empty trace": empty, "one save": one_save, "30 saves": all_saves, "30 edits": all_edits}


def nnsight_cases(model, check: bool):
    """Return {case: study} for NNsight, written as its documentation writes traces.

    NNsight returns no logits from a bare trace. So with `check`, every study also
    saves the LM head's output for the comparison, and without it (when timed) none does.
    """
    layers = model.model.layers

    def empty():
        with model.trace(PROMPT):
            if check:
                logits = model.lm_head.output.save()
        return [], logits if check else None

    def one_save():
        with model.trace(PROMPT):
            hidden = layers[SAVED_BLOCK].output.save()
            if check:
                logits = model.lm_head.output.save()
        return [hidden], logits if check else None

    def all_saves():
        # NNsight copies back to the caller only the names bound to saved values, not a
        # new list of them, so the list is made outside the trace and filled inside.
        hidden = []
        with model.trace(PROMPT):
            for block in layers:
                hidden.append(block.output.save())
            if check:
                logits = model.lm_head.output.save()
        return hidden, logits if check else None

    def all_edits():
        with model.trace(PROMPT):
            for block in layers:
                block.output[:] = block.output * SCALE
            if check:
                logits = model.lm_head.output.save()
        return [], logits if check else None

    return {"empty trace": empty, "one save": one_save, "30 saves": all_saves, "30 edits": all_edits}


def compare(swarmlens_studies, nnsight_studies) -> dict[str, float]:
    """Run every case once with both tracers and return the largest absolute difference per case."""
    differences = {}
    for name, study in swarmlens_studies.items():
        ours_saved, ours_logits = study()
        theirs_saved, theirs_logits = nnsight_studies[name]()
        if len(ours_saved) != len(theirs_saved):
            raise RuntimeError(f"{name}: swarmlens saved {len(ours_saved)} values, NNsight {len(theirs_saved)}")
        pairs = [*zip(ours_saved, theirs_saved), (ours_logits, theirs_logits)]
        differences[name] = max((ours - theirs).abs().max().item() for ours, theirs in pairs)
    return differences


def time_alternating(functions: dict[str, callable], rounds: int) -> dict[str, float]:
    """Call every function once per round, in turn, after one warm-up round, and return the median seconds."""
    for function in functions.values():
        function()
    times = {key: [] for key in functions}
    for _ in range(rounds):
        for key, function in functions.items():
            began = time.perf_counter()
            function()
            times[key].append(time.perf_counter() - began)
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="timed calls of every case and tracer (default: 20)")
    parser.add_argument("--model", default=None,
                        help="local checkpoint folder of a Llama-architecture model (default: the converted "
                             "SmolLM2-135M-Instruct in the swarmlens cache)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice, one per core). On a machine "
                             "shared with other busy processes, 1 thread gives steadier medians.")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    ensure_nnsight()

    from importlib.metadata import version

    import nnsight
    import torch
    import transformers

    from swarmlens.checkpoint import load_reference_model, load_tokenizer, resolve_checkpoint
    from swarmlens.intervene import LocalModel

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    path = resolve_checkpoint(args.model)
    print(f"checkpoint: {path}")
    print(f"torch {torch.__version__} (intra-op threads: {torch.get_num_threads()}), "
          f"transformers {transformers.__version__}, nnsight {version('nnsight')}, {os.cpu_count()} CPU cores, load average "
          f"{' '.join(f'{value:.1f}' for value in os.getloadavg())}")

    # Two copies of the same weights, so that NNsight's wrapping of its modules cannot slow
    # down or change the swarmlens side, and the plain forward runs on an unwrapped model.
    hf_model = load_reference_model(path)
    tokenizer = load_tokenizer(path)
    local = LocalModel(hf_model, tokenizer)
    traced = nnsight.TransformersModel(load_reference_model(path), task="text-generation",
                                       tokenizer=load_tokenizer(path))
    encoded = tokenizer(PROMPT, return_tensors="pt")

    def plain_forward():
        with torch.no_grad():
            hf_model(**encoded)

    ours = swarmlens_cases(local)
    differences = compare(ours, nnsight_cases(traced, check=True))
    for name, difference in differences.items():
        print(f"check {name}: max |swarmlens - NNsight| over saved values and logits = {difference:.2e}")

    theirs = nnsight_cases(traced, check=False)
    functions = {("plain", ""): plain_forward}
    for name in ours:
        functions[("swarmlens", name)] = ours[name]
        functions[("nnsight", name)] = theirs[name]
    medians = time_alternating(functions, args.rounds)
    plain = medians[("plain", "")]

    print(f"plain Hugging Face forward: {plain * 1000:.1f} ms (median of {args.rounds})")
    print(f"{'case':<12} {'swarmlens ms':>12} {'NNsight ms':>11} {'plain ms':>9} "
          f"{'swarmlens/NNsight':>18} {'swarmlens/plain':>16} {'NNsight/plain':>14}")
    for name in ours:
        mine, baseline = medians[("swarmlens", name)], medians[("nnsight", name)]
        print(f"{name:<12} {mine * 1000:12.1f} {baseline * 1000:11.1f} {plain * 1000:9.1f} "
              f"{mine / baseline:18.2f} {mine / plain:16.2f} {baseline / plain:14.2f}")


if __name__ == "__main__":
    main()
