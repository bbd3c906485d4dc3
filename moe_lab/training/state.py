"""Trainer state that travels with a checkpoint: step, data position, RNG states.

    state = trainer_state(global_step=7, epoch=0, micro=14, total_steps=100, args=training_config)
    restore_rng(state["rng"], rank=0, seed=42, global_step=7)

Rank 0 restores the saved RNG states exactly; other ranks reseed deterministically from the
seed, their rank and the step (their states are not saved).
"""

from __future__ import annotations

import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch


def _py_rng_state() -> List[Any]:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _set_py_rng_state(s: Optional[List[Any]]) -> None:
    if s:
        random.setstate((s[0], tuple(s[1]), s[2]))


def _np_rng_state() -> List[Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]


def _set_np_rng_state(s: Optional[List[Any]]) -> None:
    if s:
        np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), s[2], s[3], s[4]))


def rng_state() -> Dict[str, Any]:
    """This process's torch (and CUDA), Python and NumPy RNG states, as JSON-able lists."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state().tolist(), "python": _py_rng_state(), "numpy": _np_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def trainer_state(global_step: int, epoch: int, micro: int, total_steps: Optional[int], args: Any) -> Dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint (``args``: the TrainingConfig)."""
    return {
        "global_step": global_step,
        "epoch": epoch,
        "micro_batch_in_epoch": micro,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "total_steps": total_steps,
        "training_args": args.to_dict(),
        "rng": rng_state(),
    }


def restore_rng(rng: Dict[str, Any], rank: int, seed: int, global_step: int) -> None:
    """Rank 0 gets the saved states back; other ranks a deterministic reseed."""
    if rank == 0 and "torch" in rng:
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in rng["cuda"]])
        _set_py_rng_state(rng.get("python"))
        _set_np_rng_state(rng.get("numpy"))
    else:
        torch.manual_seed(seed + rank + 7919 * global_step)
