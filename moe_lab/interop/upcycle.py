"""Sparse upcycling: turn a dense model into an MoE whose experts start as copies of the dense MLP.

    import moe_lab
    moe = moe_lab.upcycle(dense_model, num_experts=8, experts_per_token=2)   # a MoEModel
    moe = moe_lab.upcycle("llama-dir/", num_experts=8, experts_per_token=2)  # a transformers Llama dir
    upcycle_checkpoint("dense-ckpt/", "moe-ckpt/", 8, 2)                      # = moe-lab upcycle

Sources: a :class:`~moe_lab.MoEModel` with dense layers (``moe_layer_frequency > 1``; a value
above ``num_layers`` makes every layer dense), a moe_lab checkpoint directory of one, or a
local transformers Llama/Mistral directory (see :mod:`moe_lab.interop.hf_llama`).

Every dense MLP becomes an MoE layer of ``num_experts`` identical copies of it, with a small
random router (normal, ``router_init_std``, default ``initializer_range``). The router is
top-k with the k weights renormalised to sum to 1 and no capacity limit, so each token's
output is ``sum_k w_k * mlp(x) = mlp(x)``: the upcycled model computes what the dense model
computes (up to float rounding). MoE layers that the source already has are kept as they
are, which needs their expert count, top-k, expert size and routing to match.
Capacity limits and other router settings can be set afterwards when loading the saved
checkpoint: ``load_pretrained_moe(dir, capacity_factor=1.25)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from ..checkpoint import Checkpoint, read_config_json, resolve_checkpoint_dir, write_checkpoint
from ..config import MoEConfig
from ..constants import MAX_EXPERTS_SUPPORTED
from ..errors import CheckpointError, ConfigError, InputError
from ..types import RouterType
from ._io import PathLike, UnsupportedConversionError


def _check_counts(num_experts: Any, experts_per_token: Any) -> None:
    problems = []
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= MAX_EXPERTS_SUPPORTED:
        problems.append(f"num_experts must be an int in [1, {MAX_EXPERTS_SUPPORTED}], got {num_experts!r}")
    if isinstance(experts_per_token, bool) or not isinstance(experts_per_token, int) or experts_per_token < 1:
        problems.append(f"experts_per_token must be a positive int, got {experts_per_token!r}")
    elif isinstance(num_experts, int) and experts_per_token > num_experts:
        problems.append(f"experts_per_token ({experts_per_token}) must be <= num_experts ({num_experts})")
    if problems:
        raise ConfigError("; ".join(problems))


def upcycled_config(config: MoEConfig, num_experts: int, experts_per_token: int) -> MoEConfig:
    """The config of the upcycled model: every layer MoE, experts the size of the dense MLP.

    Raises:
        ConfigError: the source has no dense layer, or its existing MoE layers cannot be kept.
    """
    _check_counts(num_experts, experts_per_token)
    dense = [i for i in range(config.num_layers) if not config.is_moe_layer(i)]
    if not dense:
        raise ConfigError("the model has no dense layers (every layer is already an MoE layer); nothing to upcycle")
    changes: Dict[str, Any] = {
        "moe_layer_frequency": 1,
        "num_experts": num_experts,
        "experts_per_token": experts_per_token,
        "expert_hidden_size": config.dense_ffn_size,
        "dense_intermediate_size": None,
    }
    if config.moe_layer_indices:
        problems: List[str] = []
        if config.num_experts != num_experts:
            problems.append(f"num_experts: the existing MoE layers have {config.num_experts}, asked for {num_experts}")
        if config.experts_per_token != experts_per_token:
            problems.append(
                f"experts_per_token: the existing MoE layers use {config.experts_per_token}, asked for {experts_per_token}"
            )
        if config.intermediate_size != config.dense_ffn_size:
            problems.append(
                f"expert size: existing experts have intermediate size {config.intermediate_size}, the dense MLPs "
                f"{config.dense_ffn_size}; one MoEConfig has one expert size"
            )
        problems += _identity_routing_problems(config)
        if problems:
            raise UnsupportedConversionError(
                f"cannot keep the existing MoE layers {list(config.moe_layer_indices)} while upcycling the dense "
                f"layers {dense}",
                problems,
            )
    else:
        # a router under which identical experts reproduce the dense MLP exactly
        changes.update(router_type="top_k", normalize_router_weights=True, capacity_factor=None, router_bias=False)
    return config.replace(**changes)


def _identity_routing_problems(config: MoEConfig) -> List[str]:
    """Why copies of one MLP would not reproduce it under this router (weights must sum to 1, no drops)."""
    problems = []
    if RouterType(config.router_type) != RouterType.TOP_K:
        problems.append(f"router_type {RouterType(config.router_type).value!r}: the weights do not sum to 1 / tokens drop")
    else:
        if not config.normalize_router_weights and config.experts_per_token < config.num_experts:
            problems.append("normalize_router_weights=False: the top-k weights do not sum to 1")
        if config.capacity_factor is not None and config.drop_tokens:
            problems.append(f"capacity_factor={config.capacity_factor} with drop_tokens=True drops tokens")
    return problems


@torch.no_grad()
def upcycle(
    dense: Union[nn.Module, PathLike],
    num_experts: int,
    experts_per_token: int,
    router_init_std: Optional[float] = None,
    seed: int = 0,
) -> nn.Module:
    """Sparse upcycling (Komatsuzaki et al., 2022): a dense model becomes an MoE model.

    Args:
        dense: a MoEModel with dense layers, a moe_lab checkpoint directory of one, or a
            local transformers Llama/Mistral directory.
        num_experts: experts per MoE layer (E).
        experts_per_token: top-k.
        router_init_std: std of the new routers' normal init (default ``initializer_range``).
        seed: seed of the router init.

    Returns:
        A :class:`~moe_lab.MoEModel` whose every layer is MoE, on the source's device and
        dtype and in its train/eval mode. Its output equals the dense model's.
    """
    from ..model.transformer import MoEModel

    if not isinstance(dense, nn.Module):
        dense = load_dense_source(dense)
    config = getattr(dense, "config", None)
    if not isinstance(config, MoEConfig):
        raise InputError(f"expected a moe_lab MoEModel or a directory, got {type(dense).__name__}")
    if getattr(dense, "expert_parallel_group", None) is not None:
        raise ConfigError("the model's experts are sharded over an expert-parallel group; upcycle an unsharded model")
    new_config = upcycled_config(config, num_experts, experts_per_token)
    std = config.initializer_range if router_init_std is None else router_init_std
    if not std >= 0:
        raise ConfigError(f"router_init_std must be >= 0, got {router_init_std!r}")

    src = {k: v.detach().to("cpu", torch.float32) for k, v in dense.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state: Dict[str, torch.Tensor] = {}
    for key, value in src.items():
        if ".mlp." not in key:
            state[key] = value
    for i in range(config.num_layers):
        p = f"layers.{i}.mlp."
        if config.is_moe_layer(i):
            state.update({k: v for k, v in src.items() if k.startswith(p)})
            continue
        up, down = src[f"{p}up.weight"], src[f"{p}down.weight"]  # [I_in, D], [D, I]
        state[f"{p}experts.w_in"] = up.unsqueeze(0).repeat(num_experts, 1, 1)  # [E, I_in, D]
        state[f"{p}experts.w_out"] = down.unsqueeze(0).repeat(num_experts, 1, 1)  # [E, D, I]
        state[f"{p}router.gate.weight"] = torch.randn(num_experts, config.hidden_size, generator=generator) * std
    model = MoEModel.from_config(new_config)
    model.load_state_dict(state, strict=True)
    ref = next(dense.parameters())
    model.to(device=ref.device, dtype=ref.dtype)
    model.train(dense.training)
    return model


def open_dense_source(path: PathLike) -> Checkpoint:
    """The checkpoint of a dense model: a moe_lab checkpoint (or job output) directory, or a
    transformers Llama/Mistral directory."""
    from .hf_llama import DENSE_MODEL_TYPES

    d = Path(path).expanduser()
    if not d.is_dir():
        raise CheckpointError(f"source directory not found: {d}")
    d = resolve_checkpoint_dir(d)
    model_type = read_config_json(d).get("model_type")
    if model_type is not None and model_type not in DENSE_MODEL_TYPES:
        raise CheckpointError(
            f"{d} holds a transformers {model_type!r} model; upcycling reads moe_lab checkpoints and "
            f"transformers {list(DENSE_MODEL_TYPES)} directories"
        )
    return Checkpoint.open(d)


def load_dense_source(path: PathLike) -> nn.Module:
    """A dense model from a moe_lab checkpoint (or job output) directory or a Llama/Mistral directory."""
    return open_dense_source(path).build_model()


class _TokenizerFiles:
    """Carries a transformers directory's tokenizer files into a checkpoint (``save_pretrained`` copies them)."""

    def __init__(self, src: Path) -> None:
        self.src = src

    def save_pretrained(self, directory: str) -> List[str]:
        from .hf_tokenizer import copy_tokenizer_files

        return copy_tokenizer_files(self.src, directory)


def _source_tokenizer(source: Checkpoint) -> Any:
    """What the upcycled checkpoint saves as its tokenizer: a moe_lab checkpoint's own tokenizer,
    a transformers directory's tokenizer files as they are, or None when the source has none."""
    if not source.has_tokenizer:
        return None
    return source.tokenizer() if source.format == "moe_lab" else _TokenizerFiles(source.path)


def upcycle_checkpoint(
    src: PathLike,
    out: PathLike,
    num_experts: int,
    experts_per_token: int,
    router_init_std: Optional[float] = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Upcycle a dense checkpoint (moe_lab or transformers Llama/Mistral) into a moe_lab checkpoint
    directory, tokenizer included. Returns the output directory."""
    out_path = Path(out).expanduser()
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())) and not overwrite:
        raise ConfigError(f"output {out_path} exists and is not empty; pass overwrite=True (CLI: --overwrite)")
    source = open_dense_source(src)
    model = upcycle(source.build_model(), num_experts, experts_per_token, router_init_std=router_init_std, seed=seed)
    return write_checkpoint(out_path, model.config, model.state_dict(), tokenizer=_source_tokenizer(source))
