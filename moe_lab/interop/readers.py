"""Readers of transformers directories for :class:`moe_lab.checkpoint.Checkpoint`.

    Checkpoint.open("mixtral-dir/")      # -> MixtralCheckpoint: config and names converted
    Checkpoint.open("qwen-dir/")         # -> Qwen2MoeCheckpoint / Qwen3MoeCheckpoint
    Checkpoint.open("llama-dir/")        # -> DenseLlamaCheckpoint: an all-dense MoEModel

Importing :mod:`moe_lab.interop` registers them (``model_type`` ``mixtral``, ``qwen2_moe``,
``qwen3_moe``, ``llama``, ``mistral``) with :func:`moe_lab.checkpoint.register_format`; the checkpoint package never
imports this layer at module level. Each reader only says how its format differs: the
config (:func:`~moe_lab.interop.hf_mixtral.moe_config_from_mixtral`), the tensor names
(run on meta tensors first, so shapes are checked before any data is read) and the
tokenizer. Header checks, memory checks and loading are the :class:`Checkpoint`'s.
Weights may be sharded (``model.safetensors.index.json``).
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from ..checkpoint import Checkpoint, register_format
from ..config import MoEConfig
from .hf_llama import DENSE_MODEL_TYPES, dense_config_from_hf, dense_state_dict_from_hf
from .hf_mixtral import moe_config_from_mixtral, moe_state_dict_from_mixtral
from .hf_qwen import QWEN2_MOE, QWEN3_MOE, moe_config_from_qwen, moe_state_dict_from_qwen


def _hf_tokenizer(checkpoint: Checkpoint) -> Any:
    """A transformers directory's tokenizer: the moe_lab one an export came from, else transformers'."""
    from ..data.tokenizer import load_tokenizer
    from .hf_tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(checkpoint.path)
    return tok if tok is not None else load_tokenizer(str(checkpoint.path))


class MixtralCheckpoint(Checkpoint):
    """A transformers ``MixtralForCausalLM`` directory (v4 per-expert or v5 fused names)."""

    format = "hf-mixtral"
    stores_model_names = False
    sharded = True

    def _make_config(self, raw: Dict[str, Any], overrides: Dict[str, Any]) -> MoEConfig:
        return moe_config_from_mixtral(raw, **overrides)

    def _convert(self, tensors: Dict[str, torch.Tensor], config: MoEConfig) -> Dict[str, torch.Tensor]:
        return moe_state_dict_from_mixtral(tensors, config)

    def _read_tokenizer(self) -> Any:
        return _hf_tokenizer(self)


class Qwen2MoeCheckpoint(Checkpoint):
    """A transformers ``Qwen2MoeForCausalLM`` directory (shared expert with its gate; zero q/k/v biases)."""

    format = "hf-qwen2-moe"
    stores_model_names = False
    sharded = True

    def _make_config(self, raw: Dict[str, Any], overrides: Dict[str, Any]) -> MoEConfig:
        return moe_config_from_qwen(raw, **overrides)

    def _convert(self, tensors: Dict[str, torch.Tensor], config: MoEConfig) -> Dict[str, torch.Tensor]:
        return moe_state_dict_from_qwen(tensors, config, self.model_type)

    def _read_tokenizer(self) -> Any:
        return _hf_tokenizer(self)


class Qwen3MoeCheckpoint(Qwen2MoeCheckpoint):
    """A transformers ``Qwen3MoeForCausalLM`` directory (QK-norm, no shared experts)."""

    format = "hf-qwen3-moe"


class DenseLlamaCheckpoint(Checkpoint):
    """A transformers Llama or Mistral directory, read as an all-dense MoEModel (for upcycling)."""

    format = "hf-llama"
    stores_model_names = False
    sharded = True

    def _make_config(self, raw: Dict[str, Any], overrides: Dict[str, Any]) -> MoEConfig:
        return dense_config_from_hf(raw, **overrides)

    def _convert(self, tensors: Dict[str, torch.Tensor], config: MoEConfig) -> Dict[str, torch.Tensor]:
        return dense_state_dict_from_hf(tensors, config)

    def _read_tokenizer(self) -> Any:
        return _hf_tokenizer(self)


register_format("mixtral", MixtralCheckpoint)
register_format(QWEN2_MOE, Qwen2MoeCheckpoint)
register_format(QWEN3_MOE, Qwen3MoeCheckpoint)
for _model_type in DENSE_MODEL_TYPES:
    register_format(_model_type, DenseLlamaCheckpoint)
