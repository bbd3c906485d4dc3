"""GPU correctness check of every fast path against its eager reference (run on a CUDA card).

    python benchmarks/gpu_check.py

1. grouped expert matmul (torch grouped_mm, bf16) vs the eager expert loop: outputs and
   gradients, GLU and FFN experts, relative error ||fast - ref|| / ||ref||;
2. compiled decoder layers + fused cross-entropy (the trainer's fast paths) vs eager: loss
   and gradients of one training step;
3. the static-cache decoder, with its step captured as a CUDA graph, vs the same step
   without a graph and vs the reference KV-cache generation: greedy tokens identical.
Prints one line per check with the error and PASS/FAIL; exits non-zero on a failure.
"""

from __future__ import annotations

import sys

import torch

from moe_lab.model import MoEModel
from moe_lab.model.experts import GroupedExperts

FAILED = []


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


def report(name: str, err: float, tol: float) -> None:
    ok = err <= tol
    if not ok:
        FAILED.append(name)
    print(f"{name:<62} rel err {err:.2e} (tol {tol:.0e})  {'PASS' if ok else 'FAIL'}")


def check_grouped(dev: torch.device) -> None:
    for expert_type, act in (("glu", "swiglu"), ("ffn", "gelu")):
        torch.manual_seed(0)
        ex = GroupedExperts(8, 768, 3072, expert_type=expert_type, activation=act, dropout=0.0).to(dev, torch.bfloat16)
        counts = torch.tensor([900, 0, 3000, 17, 1200, 2500, 64, 511], device=dev)
        x = torch.randn(int(counts.sum()), 768, device=dev, dtype=torch.bfloat16)
        g = torch.randn_like(x)
        outs = []
        for backend in ("eager", "grouped"):
            ex.zero_grad()
            xx = x.clone().requires_grad_()
            y = ex(xx, counts, backend=backend)
            y.backward(g)
            outs.append((y.detach(), xx.grad, ex.w_in.grad.clone(), ex.w_out.grad.clone()))
        for label, a, b in zip(("out", "d_x", "d_w_in", "d_w_out"), outs[1], outs[0]):
            report(f"grouped_mm {expert_type}/{act} {label} vs eager loop (bf16)", rel(a, b), 1e-2)


def check_compiled_step(dev: torch.device) -> None:
    from moe_lab.training import MoETrainer, forward_loss

    results = []
    for fast in (False, True):
        torch.manual_seed(0)
        model = MoEModel(vocab_size=1024, hidden_size=256, num_layers=4, num_attention_heads=4, num_experts=8,
                         expert_hidden_size=512, max_position_embeddings=256, dropout=0.0)
        tr = MoETrainer(model, device="cuda", fast_paths=fast, mixed_precision=True, progress_bar=False,
                        tensorboard=False, max_grad_norm=None)
        ids = torch.randint(0, 1024, (4, 256), generator=torch.Generator().manual_seed(1))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        loss, info, _ = forward_loss(tr.model, {k: v.to(dev) for k, v in batch.items()}, float(ids[:, 1:].numel()),
                                     tr.settings)
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        results.append((loss.detach(), grads))
    report("compiled layers + fused CE: loss vs eager (bf16 autocast)", rel(results[1][0], results[0][0]), 1e-2)
    report("compiled layers + fused CE: gradients vs eager", rel(results[1][1], results[0][1]), 3e-2)


def check_static_decode(dev: torch.device) -> None:
    from moe_lab.inference import generate, pad_batch
    from moe_lab.inference.static_decode import StaticDecoder

    torch.manual_seed(0)
    model = MoEModel(vocab_size=512, hidden_size=256, num_layers=4, num_attention_heads=4, num_experts=8,
                     expert_hidden_size=512, max_position_embeddings=256, dropout=0.0).to(dev, torch.bfloat16).eval()
    prompts = [[int(t) for t in torch.randint(0, 512, (n,))] for n in (5, 17, 9, 30)]
    ids, mask = pad_batch(prompts)
    ref = generate(model, ids, mask, max_new_tokens=40, temperature=0)
    plain = StaticDecoder(model, 4, ids.shape[1] + 40, use_cuda_graph=False).generate(ids, mask, max_new_tokens=40, temperature=0)
    graph = StaticDecoder(model, 4, ids.shape[1] + 40, use_cuda_graph=True).generate(ids, mask, max_new_tokens=40, temperature=0)
    same_graph = float((graph != plain).float().mean())
    same_ref = float((graph != ref).float().mean())
    report("static decoder: CUDA-graph tokens vs no-graph tokens (mismatch share)", same_graph, 0.0)
    report("static decoder: CUDA-graph tokens vs reference generate (mismatch share)", same_ref, 0.0)


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA device")
        return 1
    dev = torch.device("cuda")
    print(f"GPU check on {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    check_grouped(dev)
    check_compiled_step(dev)
    check_static_decode(dev)
    print(f"{len(FAILED)} failed" + (f": {FAILED}" if FAILED else ""))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
