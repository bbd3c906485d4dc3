"""LM head + cross-entropy without materialising the logits: chunked, with the gradient
computed in the forward (as Liger Kernel's fused linear cross-entropy does).

    ce_sum = linear_cross_entropy_sum(h_ND, w_VD, labels_N)       # == F.cross_entropy(h @ w.T, labels, sum)

The logits of a training step at the API reference's default size are ``8192 x 50257`` values,
1.6 GB in fp32 with their gradient. Here the rows go through in chunks of ``chunk_rows``: each
chunk's logits are computed, turned into its loss and into ``softmax - onehot`` (the gradient
of the summed loss with respect to the logits), and that gradient is multiplied back right
away into the chunk's ``d_h`` and into ``d_w``. Peak extra memory is one chunk's logits.

The vocabulary is padded to a multiple of ``VOCAB_ALIGN`` inside the GEMMs (padded columns
are masked to -inf), so that the three GEMMs run as aligned tensor-core kernels: with an odd
vocabulary (50257) cuBLAS falls back to unaligned kernels several times slower. The weight,
its gradient and the checkpoint keep the real vocabulary.

Numerics: the GEMMs run in the autocast dtype when autocast is on (else the input dtype), the
log-softmax in fp32; rows whose label is ``ignore_index`` count for nothing. The eager
reference, ``F.cross_entropy(F.linear(h, w).float(), labels, reduction="sum")``, is what the
tests compare against (values and gradients).

Shape letters: N rows (tokens), D hidden, V vocabulary, Vp padded vocabulary, C chunk rows.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX

#: the padded vocabulary is a multiple of this (aligned tensor-core GEMMs)
VOCAB_ALIGN = 128
#: rows per chunk: 2048 x 50304 fp32 logits are 412 MB
DEFAULT_CHUNK_ROWS = 2048


def _chunk_loss_and_grad(
    h_CD: torch.Tensor, w_VpD: torch.Tensor, labels_C: torch.Tensor, vocab: int, ignore_index: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, d_logits_CVp)`` of one chunk; ``d_logits`` in the GEMM dtype."""
    logits_CVp = (h_CD @ w_VpD.t()).float()
    if w_VpD.shape[0] > vocab:
        logits_CVp[:, vocab:] = float("-inf")
    lse_C = torch.logsumexp(logits_CVp, dim=-1)
    valid_C = labels_C != ignore_index
    target_C = labels_C.clamp(min=0)
    picked_C = logits_CVp.gather(1, target_C.unsqueeze(1)).squeeze(1)
    loss = ((lse_C - picked_C) * valid_C).sum()
    d_logits_CVp = torch.exp(logits_CVp - lse_C.unsqueeze(1))
    d_logits_CVp.scatter_add_(1, target_C.unsqueeze(1), -torch.ones_like(picked_C).unsqueeze(1))
    d_logits_CVp = d_logits_CVp * valid_C.unsqueeze(1)
    return loss, d_logits_CVp.to(h_CD.dtype)


_chunk_fn = _chunk_loss_and_grad


def compile_chunks() -> None:
    """Run each chunk's softmax/gradient math as one compiled kernel (the GPU fast path)."""
    global _chunk_fn
    _chunk_fn = torch.compile(_chunk_loss_and_grad, dynamic=False)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, labels_N, chunk_rows, ignore_index, compute_dtype):  # type: ignore[override]
        vocab, d = w_VD.shape
        padded = -(-vocab // VOCAB_ALIGN) * VOCAB_ALIGN
        with torch.autocast(h_ND.device.type, enabled=False):
            h = h_ND.to(compute_dtype)
            w_VpD = F.pad(w_VD.to(compute_dtype), (0, 0, 0, padded - vocab))
            d_h_ND = torch.empty_like(h)
            d_w_VpD = torch.zeros(padded, d, dtype=torch.float32, device=h.device)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, h.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                loss, d_logits = _chunk_fn(h[rows], w_VpD, labels_N[rows], vocab, ignore_index)
                total += loss
                d_h_ND[rows] = d_logits @ w_VpD
                d_w_VpD += (d_logits.t() @ h[rows]).float()  # each chunk's GEMM, summed in fp32
        ctx.save_for_backward(d_h_ND, d_w_VpD[:vocab])
        ctx.dtypes = (h_ND.dtype, w_VD.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        d_h_ND, d_w_VD = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (d_h_ND * grad_out).to(h_dtype), (d_w_VD * grad_out).to(w_dtype), None, None, None, None


def linear_cross_entropy_sum(
    h_ND: torch.Tensor,
    w_VD: torch.Tensor,
    labels_N: torch.Tensor,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ignore_index: int = IGNORE_INDEX,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Summed cross-entropy of ``h_ND @ w_VD.T`` against ``labels_N`` (see the module docstring).

    ``compute_dtype``: the GEMMs' dtype; default the autocast dtype under autocast, else
    ``h_ND``'s. The result is an fp32 scalar in the graph (gradients to ``h`` and ``w``).
    """
    if compute_dtype is None:
        compute_dtype = (torch.get_autocast_dtype(h_ND.device.type) if torch.is_autocast_enabled(h_ND.device.type)
                         else h_ND.dtype)
    return _LinearCrossEntropy.apply(h_ND, w_VD, labels_N, chunk_rows, ignore_index, compute_dtype)


def shifted_linear_cross_entropy_sum(h_BSD: torch.Tensor, w_VD: torch.Tensor, labels_BS: torch.Tensor,
                                     chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Next-token loss: positions ``[:, :-1]`` predict ``labels[:, 1:]`` (as ``lm_loss_sum``)."""
    return linear_cross_entropy_sum(h_BSD[:, :-1].reshape(-1, h_BSD.shape[-1]), w_VD,
                                    labels_BS[:, 1:].reshape(-1), chunk_rows)
