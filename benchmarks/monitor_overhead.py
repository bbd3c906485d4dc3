"""ExpertMonitor overhead: training step time with and without the monitor, side by side.

    python benchmarks/monitor_overhead.py                       # the demo model on CPU
    python benchmarks/monitor_overhead.py --device cuda --batch-size 32 --seq 256
    python benchmarks/monitor_overhead.py --device cuda --trainer   # real MoETrainer runs (fast paths)

The model is the default job's (hidden 128, 4 MoE layers, 8 experts, top-2, GLU/SwiGLU,
byte vocabulary); one step is forward (with routing info) + LM and aux loss + backward +
AdamW, as in ``MoETrainer``. Steps alternate between without and with the monitor attached
(which reads ``get_current_stats()`` every ``--log-every`` steps, as the trainer does at
each logging step), so drifts of the machine hit both alike. It also times the forward
alone (inference / serving). Prints median step times, the ratio with/without and the
overhead in percent, plus the cost of the hooks alone (called directly on a real layer
output, so free of step-to-step noise) as a share of the step. Target: below 3% of the
training step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moe_lab import ExpertMonitor, MoEModel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def trainer_mode(args: argparse.Namespace) -> None:
    """Real ``MoETrainer`` runs (its fast paths on: compiled decoder layers on CUDA), ABAB order."""
    import json
    import tempfile
    from pathlib import Path

    from moe_lab.training import MoETrainer

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 256, (args.seq,), generator=g).tolist()}
            for _ in range(args.batch_size * (args.steps + 1))]
    times = {False: [], True: []}
    counts_ok = True
    for rep in range(2):
        for monitored in (False, True):
            torch.manual_seed(0)
            model = MoEModel(vocab_size=259, hidden_size=128, num_layers=4, num_attention_heads=4, num_experts=8,
                             experts_per_token=2, expert_hidden_size=256,
                             max_position_embeddings=max(256, args.seq), dropout=0.0)
            monitor = ExpertMonitor(model).start_monitoring() if monitored else None
            with tempfile.TemporaryDirectory() as out:
                trainer = MoETrainer(model, monitor=monitor, device=args.device, mixed_precision=args.device == "cuda",
                                     progress_bar=False, tensorboard=False, logging_steps=1, seed=0)
                trainer.train(rows, num_epochs=1, batch_size=args.batch_size, learning_rate=1e-3, warmup_steps=1,
                              eval_steps=10**6, save_steps=10**6, output_dir=out, max_steps=args.steps)
                recs = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            recs = [r for r in recs if "tokens_per_s" in r]
            times[monitored] += [r["tokens"] / r["tokens_per_s"] for r in recs[args.steps // 4:]]  # skip compile
            if monitored:
                total = [[0] * 8 for _ in range(4)]
                for r in recs:
                    for i, lay in enumerate(r["moe_layers"]):
                        total[i] = [a + b for a, b in zip(total[i], lay["expert_counts"])]
                counts_ok &= [lay["expert_counts"] for lay in recs[-1]["monitor"]["layers"]] == total
                monitor.stop_monitoring()
    b, m = statistics.median(times[False]), statistics.median(times[True])
    print(f"MoETrainer steps (fast paths on), {args.device}, batch {args.batch_size} x {args.seq}, "
          f"{args.steps} steps per run, runs in ABAB order, torch {torch.__version__}")
    print(f"{'':<14}{'without (ms)':>14}{'with (ms)':>12}{'ratio':>9}{'overhead':>10}")
    print(f"{'train step':<14}{1e3 * b:>14.2f}{1e3 * m:>12.2f}{m / b:>9.3f}{100 * (m / b - 1):>9.2f}%")
    print(f"monitor counts == trainer's routing counts: {counts_ok}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="timed steps per mode")
    p.add_argument("--log-every", type=int, default=10, help="read the monitor every N steps (trainer logging)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true",
                   help="compile each decoder layer first, as MoETrainer's CUDA fast path does")
    p.add_argument("--trainer", action="store_true",
                   help="time real MoETrainer runs (compiled decoder layers on CUDA) instead of a bare step")
    args = p.parse_args()
    if args.trainer:
        trainer_mode(args)
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = MoEModel(vocab_size=259, hidden_size=128, num_layers=4, num_attention_heads=4, num_experts=8,
                     experts_per_token=2, expert_hidden_size=256, max_position_embeddings=max(256, args.seq),
                     dropout=0.0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 256, (args.batch_size, args.seq), device=device)
    monitor = ExpertMonitor(model)
    if args.compile:
        for layer in model.layers:
            layer.compile(dynamic=False)

    def train_step() -> None:
        logits, info = model(ids, return_routing_info=True)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()) + info["aux_loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the trainer reads the loss every step

    @torch.no_grad()
    def forward_step() -> None:
        model(ids)
        _sync(device)

    def timed(step_fn, monitored: bool, step: int) -> float:
        if monitored:
            monitor.start_monitoring(reset=False)
        t0 = time.perf_counter()
        step_fn()
        if monitored and step % args.log_every == 0:
            monitor.get_current_stats().to_dict()
        _sync(device)
        elapsed = time.perf_counter() - t0
        if monitored:
            monitor.stop_monitoring()
        return elapsed

    results = {}
    for name, fn in (("train step", train_step), ("forward only", forward_step)):
        for i in range(6):  # warm-up (both modes: compiled layers build a graph for each)
            timed(fn, i % 2 == 1, 1)
        _sync(device)
        base, mon = [], []
        for i in range(args.steps):  # pairs in alternating order: drifts hit both modes alike
            for monitored in ((False, True) if i % 2 == 0 else (True, False)):
                (mon if monitored else base).append(timed(fn, monitored, i))
        results[name] = (statistics.median(base), statistics.median(mon))

    # the hook alone, called directly on a real layer output: the per-forward cost without the noise
    idx, layer = monitor.monitored_layers[0]
    with torch.no_grad():
        x = torch.randn(args.batch_size, args.seq, 128, device=device)
        out = layer(x)
    monitor.start_monitoring()  # attaches the layer's accumulators; the hook is then called by hand
    hook = monitor.make_hook()
    reps = 2000
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        hook(layer, (x, None), {}, out)
    _sync(device)
    hook_s = (time.perf_counter() - t0) / reps * len(monitor.monitored_layers)  # per model forward

    stats = monitor.get_current_stats()
    print(f"ExpertMonitor overhead, {device.type}{', compiled layers' if args.compile else ''}, "
          f"batch {args.batch_size} x {args.seq} tokens, "
          f"{len(monitor.monitored_layers)} MoE layers x 8 experts top-2, torch {torch.__version__}")
    print(f"({args.steps} steps per mode, alternating; stats read every {args.log_every} steps)")
    print(f"{'':<14}{'without (ms)':>14}{'with (ms)':>12}{'ratio':>9}{'overhead':>10}{'hooks alone':>13}")
    for name, (b, m) in results.items():
        print(f"{name:<14}{1e3 * b:>14.2f}{1e3 * m:>12.2f}{m / b:>9.3f}{100 * (m / b - 1):>9.2f}%"
              f"{100 * hook_s / b:>12.2f}%")
    print(f"hooks alone: {1e6 * hook_s:.1f} us per model forward ({len(monitor.monitored_layers)} hook calls), "
          f"as a share of the step time without the monitor")
    assert stats.num_forwards == reps


if __name__ == "__main__":
    main()
