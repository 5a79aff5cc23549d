"""Compatibility shims that let Petals 2.2.0 and hivemind 1.1.10.post2 run with torch 2.13.0.

Used only by the Petals baseline (benchmarks/petals_comparison.py and the scripts it starts in
benchmarks/.venv-petals). Call `apply()` before the first import of hivemind or Petals:

- hivemind 1.1.10.post2 imports `_refresh_per_optimizer_state` from
  `torch.cuda.amp.grad_scaler`. torch moved that helper to `torch.amp.grad_scaler`, so the
  shim puts it back under the old module. It touches nothing else, and the benchmark never
  uses the grad scaler (it only serves inference).

`write_petals_checkpoint()` is the other shim, for the checkpoint rather than the code: the
converted checkpoint's config.json is written by transformers 5, which keeps the rotary base
under `rope_parameters`. transformers 4.34.1 (the one Petals 2.2.0 runs with) reads only a
top-level `rope_theta` and would silently fall back to 10000. So Petals gets a folder whose
config.json has `rope_theta` set from `rope_parameters`. Its other files are links to the
original ones, so the weights are the same.
"""

import importlib
import json
from pathlib import Path


def _restore_grad_scaler_helper() -> None:
    legacy = importlib.import_module("torch.cuda.amp.grad_scaler")
    if hasattr(legacy, "_refresh_per_optimizer_state"):
        return
    current = importlib.import_module("torch.amp.grad_scaler")
    legacy._refresh_per_optimizer_state = current._refresh_per_optimizer_state


def apply() -> None:
    """Install every shim. Calling it again does nothing."""
    _restore_grad_scaler_helper()


def write_petals_checkpoint(source: Path, target: Path) -> Path:
    """Fill `target` with links to the files of checkpoint folder `source` and return `target`.

    Its config.json is rewritten so that transformers 4.34 reads it as transformers 5 reads the original.
    """
    source, target = Path(source).resolve(), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "config.json" and not (target / item.name).exists():
            (target / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(legacy_config(config), indent=2) + "\n")
    return target


def legacy_config(config: dict) -> dict:
    """Return `config` with the transformers 5 keys that transformers 4.34 reads under older names."""
    config = dict(config)
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r} has no equivalent in transformers 4.34's config")
    if "rope_theta" in rope:
        config.setdefault("rope_theta", rope["rope_theta"])
    if "dtype" in config:
        config.setdefault("torch_dtype", config["dtype"])
    return config
