"""GPU correctness check of every fast path against its eager reference (run on a CUDA card).

    python benchmarks/gpu_check.py

1. grouped expert matmul (torch grouped_mm, bf16) vs the eager expert loop: outputs and
   gradients, GLU and FFN experts, relative error ||fast - ref|| / ||ref||;
2. compiled decoder layers + fused cross-entropy (the trainer's fast paths) vs eager: loss
   and gradients of one training step;
3. ``training.cuda_graphs`` vs the same compiled layers without graphs: losses and weights
   after three steps of two accumulated micro-batches;
4. the inference engine: fp32 greedy tokens equal step-by-step argmax of the full forward
   (mixed-length prompts joining mid-run); in bf16 the CUDA-graph step gives the same tokens
   as the eager step, seeded sampling is the same batched or alone, and each token the
   engine picks is the full forward's argmax up to a logit gap of 0.125 (bf16 reduction
   order: the two compute the same function with different attention kernels).
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


def check_cuda_graphs(dev: torch.device) -> None:
    """training.cuda_graphs (the compiled layers replayed as CUDA graphs) against the same
    compiled layers without graphs: three steps of two accumulated micro-batches each, bf16
    autocast, the same kernels, so losses and final weights agree to rounding (a replay that
    overwrote an earlier micro-batch's gradients would be off by far more)."""
    from moe_lab.training import MoETrainer, train_step

    g = torch.Generator().manual_seed(2)
    steps = [[{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
              for ids in torch.randint(0, 1024, (2, 4, 256), generator=g).to(dev)] for _ in range(3)]
    runs = []
    for graphs in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = MoEModel(vocab_size=1024, hidden_size=256, num_layers=4, num_attention_heads=4, num_experts=8,
                         expert_hidden_size=512, max_position_embeddings=256, dropout=0.0)
        tr = MoETrainer(model, device="cuda", fast_paths=True, mixed_precision=True, progress_bar=False,
                        tensorboard=False, cuda_graphs=graphs, lm_loss="chunked")
        tr.setup_optimizer(1e-3, 1, 10)
        losses = [train_step(tr.model, tr.optimizer, micro, tr.runtime, scheduler=tr.scheduler,
                             settings=tr.settings).loss_share for micro in steps]
        weights = torch.cat([p.detach().flatten().float() for p in model.parameters()])
        runs.append((torch.tensor(losses), weights))
    report("cuda_graphs (2 micro-batches, 3 steps): losses vs compiled without graphs", rel(runs[1][0], runs[0][0]), 1e-3)
    report("cuda_graphs (2 micro-batches, 3 steps): weights vs compiled without graphs", rel(runs[1][1], runs[0][1]), 1e-3)


def _engine_tokens(model, prompts, new, use_cuda_graph, slots=2, **params):
    """Greedy (or seeded) tokens of ``prompts`` through one engine with ``slots`` slots:
    later prompts join while earlier ones decode (continuous batching)."""
    from moe_lab.inference import InferenceEngine, SamplingParams

    eng = InferenceEngine(model, max_batch_size=slots, max_seq_len=64 + new, prefill_chunk_size=16,
                          use_cuda_graph=use_cuda_graph)
    reqs = [eng.submit(p, SamplingParams(new, **params)) for p in prompts]
    eng.run_until_done()
    return [r.token_ids for r in reqs], eng


def _mismatch(a, b):
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x != y for x, y in pairs) / max(1, len(pairs))


def check_engine(dev: torch.device) -> None:
    """The inference engine: fp32 parity with the full forward; bf16 CUDA graph vs eager step;
    bf16 tokens vs the full forward, teacher-forced (each chosen token's logit within a bf16
    tolerance of the maximum)."""
    torch.manual_seed(0)
    kw = dict(vocab_size=512, hidden_size=256, num_layers=4, num_attention_heads=4, num_experts=8,
              expert_hidden_size=512, max_position_embeddings=256, dropout=0.0)
    prompts = [[int(t) for t in torch.randint(0, 512, (n,))] for n in (5, 17, 9, 30)]
    new = 40

    def full_forward_argmax(model, prompt):
        seq = torch.tensor([prompt], device=dev)
        with torch.no_grad():
            for _ in range(new):
                seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return seq[0, len(prompt):].tolist()

    fp32 = MoEModel(**kw).to(dev).eval()
    got, _ = _engine_tokens(fp32, prompts, new, None, temperature=0)
    ref = [full_forward_argmax(fp32, p) for p in prompts]
    report("engine fp32 greedy vs step-by-step full-forward argmax (mismatch share)", _mismatch(got, ref), 0.0)

    bf16 = fp32.to(torch.bfloat16)
    graph, eng = _engine_tokens(bf16, prompts, new, None, temperature=0)
    if not eng.use_cuda_graph:
        print("engine: CUDA graphs not available for this model/device (grouped GEMM needs bf16 on sm90+); skipped")
        return
    eager, _ = _engine_tokens(bf16, prompts, new, False, temperature=0)
    print(f"engine bf16 greedy: CUDA-graph step vs eager step, mismatch share {_mismatch(graph, eager):.3f} "
          "(information: once one token differs the continuations differ; the checks below judge each "
          "against the full forward)")
    s_graph, _ = _engine_tokens(bf16, prompts, new, None, temperature=0.8, top_p=0.9, top_k=50, seed=5)
    s_alone = [_engine_tokens(bf16, [p], new, None, temperature=0.8, top_p=0.9, top_k=50, seed=5)[0][0] for p in prompts]
    report("engine bf16 seeded sampling: batched vs alone (mismatch share)", _mismatch(s_graph, s_alone), 0.05)
    # teacher-forced: the full forward over prompt + the engine's tokens, at every new position
    for label, tokens in (("CUDA-graph", graph), ("eager", eager)):
        gaps = []
        exact = 0
        with torch.no_grad():
            for p, toks in zip(prompts, tokens):
                seq = torch.tensor([p + toks], device=dev)
                logits = bf16(seq)[0, len(p) - 1 : len(p) - 1 + len(toks)].float()  # [new, V]
                chosen = logits.gather(1, torch.tensor(toks, device=dev)[:, None])[:, 0]
                gaps.append((logits.max(dim=1).values - chosen).max().item())
                exact += int((logits.argmax(dim=1).cpu() == torch.tensor(toks)).sum())
        print(f"engine bf16 {label} tokens that are the exact argmax of the bf16 full forward: "
              f"{exact}/{len(prompts) * new} (information)")
        # bf16 keeps 8 bits of mantissa: logits of a few units differ by ~0.03 between reduction orders
        report(f"engine bf16 {label} greedy: max logit gap to the full forward's argmax (abs)", max(gaps), 0.125)


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA device")
        return 1
    dev = torch.device("cuda")
    print(f"GPU check on {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    check_grouped(dev)
    check_compiled_step(dev)
    check_cuda_graphs(dev)
    check_engine(dev)
    print(f"{len(FAILED)} failed" + (f": {FAILED}" if FAILED else ""))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
