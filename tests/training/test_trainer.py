import json
import math

import pytest
import torch
from helpers import tiny_config

from moe_lab import ConfigError, InputError, MoEModel
from moe_lab.training import EvalResult, MoETrainer, TrainingResult


def _rows(n=32, seq=12, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (seq,), generator=g).tolist()} for _ in range(n)]


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _model(**kw):
    torch.manual_seed(0)
    return MoEModel.from_config(tiny_config(**kw))


def _trainer(model, **kw):
    base = dict(mixed_precision=False, progress_bar=False, tensorboard=False, seed=0, logging_steps=1)
    base.update(kw)
    return MoETrainer(model, **base)


def _train(trainer, data, tmp_path, **kw):
    base = dict(num_epochs=1, batch_size=8, learning_rate=1e-2, warmup_steps=2, eval_steps=1000, save_steps=1000,
                output_dir=str(tmp_path))
    base.update(kw)
    return trainer.train(ListDataset(data), **base)


def test_gradient_accumulation_is_exact(tmp_path):
    """2 micro-batches of 4 == 1 batch of 8 (LM loss + z-loss; lb loss off, see the trainer docs)."""
    data = _rows(32)
    # ragged lengths so token-count normalisation matters
    for i, r in enumerate(data):
        r["input_ids"] = r["input_ids"][: 6 + i % 6]
    a = _model(load_balancing_loss_coef=0.0)
    b = _model(load_balancing_loss_coef=0.0)
    ra = _train(_trainer(a, gradient_accumulation_steps=2), data, tmp_path / "a", batch_size=4, max_steps=3)
    rb = _train(_trainer(b, gradient_accumulation_steps=1), data, tmp_path / "b", batch_size=8, max_steps=3)
    assert ra.global_step == rb.global_step == 3
    for x, y in zip(ra.history["loss"], rb.history["loss"]):
        assert x == pytest.approx(y, rel=1e-5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_resume_gives_the_same_losses_and_weights(tmp_path):
    data = _rows(64)

    def run(out, crash_at=None, resume=None):
        model = _model(dropout=0.1)  # dropout: the RNG state must be restored too

        def crash(rec):
            if crash_at is not None and rec["step"] == crash_at:
                raise KeyboardInterrupt("simulated crash")

        trainer = _trainer(model, callbacks=[crash])
        kw = dict(batch_size=8, max_steps=6, save_steps=2)
        if resume:
            kw["resume_from"] = resume
        return model, _train(trainer, data, out, **kw)

    full_model, full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crashed", crash_at=5)
    assert (tmp_path / "crashed" / "checkpoints" / "step-000004").is_dir()
    resumed_model, resumed = run(tmp_path / "crashed", resume="latest")
    assert resumed.global_step == 6
    assert resumed.history["step"] == [5, 6]
    assert resumed.history["loss"] == pytest.approx(full.history["loss"][4:], rel=1e-6)
    for (n, p), (_, q) in zip(full_model.named_parameters(), resumed_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_loss_falls_on_a_memorisable_set(tmp_path):
    data = _rows(8, seq=16) * 4
    model = _model()
    res = _train(_trainer(model), data, tmp_path, num_epochs=20, batch_size=8, learning_rate=1e-2, warmup_steps=5)
    assert isinstance(res, TrainingResult)
    assert res.history["loss"][-1] < 0.35 * res.history["loss"][0]
    assert res.tokens_per_second > 0 and res.checkpoint_path.endswith("model")


def test_outputs_metrics_tensorboard_and_eval(tmp_path):
    data = _rows(48)
    model = _model()
    trainer = _trainer(model, tensorboard=True, logging_steps=2)
    res = trainer.train(ListDataset(data), ListDataset(_rows(10, seed=1)), num_epochs=1, batch_size=8,
                        learning_rate=1e-2, warmup_steps=1, eval_steps=3, save_steps=1000, output_dir=str(tmp_path))
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [l for l in lines if "loss" in l]
    assert [l["step"] for l in train_lines] == [2, 4, 6]
    layer = train_lines[0]["moe_layers"][0]
    for key in ("load_balancing_loss", "router_z_loss", "load_imbalance_max_mean", "load_cv", "dropped_fraction"):
        assert key in layer and math.isfinite(layer[key])
    assert sum(layer["expert_counts"]) == 2 * 8 * 12 * 2  # 2 steps x 8 rows x 12 tokens x top-2
    assert any("eval_loss" in l for l in lines)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert res.eval_loss is not None and res.eval_perplexity == pytest.approx(math.exp(res.eval_loss))
    for key in ("loss", "lr", "tokens_per_s", "eval_loss"):
        assert key in res.history


def test_evaluate_returns_routing_statistics():
    model = _model()
    trainer = _trainer(model)
    ev = trainer.evaluate(ListDataset(_rows(10)), batch_size=4)
    assert isinstance(ev, EvalResult)
    assert ev.num_tokens == 10 * 11
    assert ev.perplexity == pytest.approx(math.exp(ev.loss))
    assert len(ev.expert_counts) == 2 and sum(ev.expert_counts[0]) == 10 * 12 * 2
    assert len(ev.load_imbalance) == 2 and ev.load_imbalance[0] >= 1.0
    assert trainer.evaluate(ListDataset(_rows(10)), batch_size=4, num_samples=4).num_tokens == 4 * 11


def test_accepts_hf_dataset_and_raw_text(tmp_path):
    from datasets import Dataset

    hf = Dataset.from_list(_rows(16))
    model = _model(vocab_size=259)
    trainer = _trainer(model)
    r1 = trainer.train(hf, num_epochs=1, batch_size=8, learning_rate=1e-3, warmup_steps=1, output_dir=str(tmp_path / "hf"))
    assert r1.global_step == 2
    text = ["the quick brown fox jumps over the lazy dog " * 5] * 20
    trainer = _trainer(_model(vocab_size=259), max_length=32)
    r2 = trainer.train(text, num_epochs=1, batch_size=4, learning_rate=1e-3, warmup_steps=1, output_dir=str(tmp_path / "txt"))
    assert r2.global_step >= 1


def test_bf16_mixed_precision_on_cpu(tmp_path):
    model = _model()
    trainer = _trainer(model, mixed_precision=True)
    assert trainer.settings.amp_dtype == torch.bfloat16
    res = _train(trainer, _rows(16), tmp_path, max_steps=2)
    assert all(math.isfinite(x) for x in res.history["loss"])


def test_default_optimizer_decay_groups():
    model = _model()
    trainer = _trainer(model)
    trainer.setup_optimizer(1e-3, 1, 10)
    decay, no_decay = trainer.optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "embed_tokens.weight" in nd and any("norm" in n for n in nd)
    assert not any("norm" in names[id(p)] or "embed" in names[id(p)] for p in decay["params"])
    # warmup then cosine decay
    lrs = []
    for _ in range(10):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < lrs[1]


def test_bad_trainer_arguments(tmp_path):
    model = _model()
    with pytest.raises(ConfigError, match="unknown MoETrainer option"):
        MoETrainer(model, learning_rat=1)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps = 0"):
        MoETrainer(model, gradient_accumulation_steps=0)
    trainer = _trainer(model)
    with pytest.raises(InputError, match="fewer than one batch"):
        _train(trainer, _rows(4), tmp_path, batch_size=8)
    with pytest.raises(InputError, match="has neither an 'input_ids' nor a 'text' column; it has \\['foo'\\]"):
        from datasets import Dataset

        trainer.train(Dataset.from_dict({"foo": [1, 2]}), output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="unknown train\\(\\) option"):
        trainer.train(ListDataset(_rows(8)), output_dir=str(tmp_path), max_step=3)


# ---- the API reference's Quick Start ------------------------------------------------------

_QUICK_TEXTS = [f"document {i}: " + " ".join(str(i * j) for j in range(40)) for i in range(48)]


@pytest.mark.parametrize("form", ["hf_text", "list", "tokenized"])
def test_quick_start_runs_as_written(tmp_path, monkeypatch, form):
    """``MoETrainer(model).train(dataset)`` with every default of the reference (3 epochs,
    batch 16, ./outputs), at tiny model sizes, for the three dataset forms it accepts."""
    from datasets import Dataset

    from moe_lab import MoEModel, MoETrainer, prepare_moe_dataset  # the reference's import line

    monkeypatch.chdir(tmp_path)
    if form == "hf_text":
        dataset = Dataset.from_dict({"text": _QUICK_TEXTS})
    elif form == "list":
        dataset = list(_QUICK_TEXTS)
    else:
        dataset = prepare_moe_dataset(Dataset.from_dict({"text": _QUICK_TEXTS}), None, max_length=64)
    model = MoEModel(num_experts=8, experts_per_token=2, vocab_size=260, hidden_size=32, num_layers=1,
                     num_attention_heads=2)
    trainer = MoETrainer(model)
    result = trainer.train(dataset)
    assert isinstance(result, TrainingResult)
    assert result.global_step >= 3 and math.isfinite(result.train_loss)  # 3 epochs of >= 1 step
    assert (tmp_path / "outputs" / "model" / "model.safetensors").is_file()


def test_optimizer_as_class_or_factory_and_scheduler_factory(tmp_path):
    """An optimizer class is built with the default decay groups and the train() lr; a
    factory gets the parameters; a scheduler factory gets the optimizer."""
    import functools

    model = _model()
    t = _trainer(model, optimizer=torch.optim.SGD)
    t.setup_optimizer(0.5, 1, 10)
    assert type(t.optimizer) is torch.optim.SGD and t.optimizer.param_groups[0]["initial_lr"] == 0.5
    assert len(t.optimizer.param_groups) == 2  # decay / no-decay
    t = _trainer(model, optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9),
                 scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.5))
    t.setup_optimizer(0.5, 1, 10)
    assert t.optimizer.defaults["momentum"] == 0.9 and t.optimizer.param_groups[0]["lr"] == 0.1
    assert isinstance(t.scheduler, torch.optim.lr_scheduler.StepLR) and t.scheduler.step_size == 3
    with pytest.raises(ConfigError, match="optimizer must be"):
        _trainer(model, optimizer=3)
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="different optimizer"):
        _trainer(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                 scheduler=torch.optim.lr_scheduler.StepLR(other, 2))


def test_resume_with_another_optimizer_class_fails_clearly(tmp_path):
    from moe_lab import CheckpointError

    trainer = _trainer(_model(), optimizer=torch.optim.SGD)
    _train(trainer, _rows(16), tmp_path / "a", max_steps=1)
    with pytest.raises(CheckpointError, match="holds SGD state but the optimizer is AdamW"):
        _train(_trainer(_model()), _rows(16), tmp_path / "b", max_steps=2, resume_from=str(tmp_path / "a" / "model"))


def test_save_model_after_train_resumes_at_the_data_position(tmp_path):
    """save_model records where training stopped, so resuming from it continues the run."""
    rows = _rows(32)
    full = _train(_trainer(_model()), rows, tmp_path / "full", max_steps=4, batch_size=4)
    first = _trainer(_model())
    _train(first, rows, tmp_path / "first", max_steps=2, batch_size=4)
    first.save_model(tmp_path / "saved")
    rest = _train(_trainer(_model()), rows, tmp_path / "rest", max_steps=4, batch_size=4,
                  resume_from=str(tmp_path / "saved"))
    assert rest.history["step"] == [3, 4]
    assert rest.history["loss"] == pytest.approx(full.history["loss"][2:], rel=1e-5)
