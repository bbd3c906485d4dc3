"""Interop with the Hugging Face ecosystem: transformers Mixtral, Qwen2-MoE and Qwen3-MoE
export/import, tokenizer files, and sparse upcycling of dense models.

    from moe_lab.interop import export_hf_mixtral, export_hf_qwen2_moe, import_hf_mixtral, upcycle

    export_hf_mixtral("outputs/demo/model", "hf-out/")        # MixtralForCausalLM directory
    export_hf_qwen2_moe(model, "hf-qwen/")                     # shared expert + gate: Qwen2MoeForCausalLM
    export_hf_qwen3_moe(model, "hf-qwen3/")                    # qk_norm=True: Qwen3MoeForCausalLM
    model, tok = import_hf_mixtral("hf-out/")                  # back, with the tokenizer
    moe = upcycle(dense_model, num_experts=8, experts_per_token=2)

CLI: ``moe-lab export CKPT --format hf-mixtral|hf-qwen2-moe|hf-qwen3-moe --out DIR``,
and ``moe-lab upcycle SRC --num-experts 8 --experts-per-token 2 --out DIR``.
``load_pretrained_moe`` and ``moe_lab.checkpoint.Checkpoint.open`` read transformers Mixtral,
Qwen2-MoE and Qwen3-MoE directories too (see :mod:`moe_lab.interop.readers`).

transformers itself is never imported here: the files are plain JSON and safetensors.
"""

from ._io import UnsupportedConversionError
from .hf_llama import load_hf_llama_dense
from .hf_mixtral import (
    check_mixtral_exportable,
    export_hf_mixtral,
    import_hf_mixtral,
    load_hf_mixtral,
    mixtral_export_problems,
)
from .hf_qwen import (
    export_hf_qwen2_moe,
    export_hf_qwen3_moe,
    import_hf_qwen2_moe,
    import_hf_qwen3_moe,
    load_hf_qwen_moe,
    qwen2_moe_export_problems,
    qwen3_moe_export_problems,
)
from .hf_tokenizer import byte_tokenizer_backend, load_hf_tokenizer, save_hf_tokenizer
from .readers import DenseLlamaCheckpoint, MixtralCheckpoint  # registers the readers with moe_lab.checkpoint
from .upcycle import upcycle, upcycle_checkpoint
from ._formats import EXPORTERS, FORMATS

__all__ = [
    "DenseLlamaCheckpoint",
    "EXPORTERS",
    "FORMATS",
    "MixtralCheckpoint",
    "UnsupportedConversionError",
    "byte_tokenizer_backend",
    "check_mixtral_exportable",
    "export_hf_mixtral",
    "export_hf_qwen2_moe",
    "export_hf_qwen3_moe",
    "import_hf_mixtral",
    "import_hf_qwen2_moe",
    "import_hf_qwen3_moe",
    "load_hf_llama_dense",
    "load_hf_mixtral",
    "load_hf_qwen_moe",
    "load_hf_tokenizer",
    "mixtral_export_problems",
    "qwen2_moe_export_problems",
    "qwen3_moe_export_problems",
    "save_hf_tokenizer",
    "upcycle",
    "upcycle_checkpoint",
]
