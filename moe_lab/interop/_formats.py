"""The export formats by CLI name: ``moe-lab export --format NAME`` looks them up here.

    EXPORTERS["hf-qwen3-moe"](checkpoint_dir, "hf-out/")   # == export_hf_qwen3_moe(...)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

from .hf_mixtral import export_hf_mixtral
from .hf_qwen import export_hf_qwen2_moe, export_hf_qwen3_moe

#: format name -> its export function (all called as ``fn(model_or_checkpoint, out_dir, ...)``)
EXPORTERS: Dict[str, Callable[..., Any]] = {
    "hf-mixtral": export_hf_mixtral,
    "hf-qwen2-moe": export_hf_qwen2_moe,
    "hf-qwen3-moe": export_hf_qwen3_moe,
}
#: every format ``moe-lab export --format`` writes
FORMATS: Tuple[str, ...] = tuple(EXPORTERS)
