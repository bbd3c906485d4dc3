"""Ray Train with expert (and tensor) parallelism on one local Ray cluster (gloo, CPU).

The central check: 2 workers with EP 2 (or TP 2) compute exactly what one process computes
on the same global batch (per-step losses and final weights, fp32, dropout 0, rel. err <= 1e-5).
"""

import os
import signal
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import tiny_config

from moe_lab import DistributedError, MoEModel
from moe_lab.checkpoint import is_sharded_checkpoint
from moe_lab.orchestration.cluster import init_ray, shutdown_ray
from moe_lab.orchestration.train import DistributedMoETrainer
from moe_lab.training import MoETrainer, load_pretrained_moe

STEPS = 4
TRAIN = dict(batch_size=8, learning_rate=1e-2, warmup_steps=1, eval_steps=1000, save_steps=2, max_steps=STEPS)
OPTS = dict(mixed_precision=False, progress_bar=False, tensorboard=False, seed=0, logging_steps=1)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    init_ray(num_cpus=4, object_store_memory=300 * 1024**2, log_to_driver=False, include_dashboard=False)
    yield
    shutdown_ray()


def _model(**kw):
    torch.manual_seed(0)
    return MoEModel.from_config(tiny_config(**kw))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 97, (6 + i % 7,), generator=g).tolist()} for i in range(64)]
    return Dataset.from_list(rows)  # ragged: token-count normalisation matters


def _assert_close_models(a, b, rtol=1e-5):
    """Relative error per tensor, ||a - b|| / ||b|| (Adam turns fp32 summation-order noise in
    near-zero gradients into single-element differences, so elementwise rtol is too strict)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for n in sa:
        rel = float((sa[n].double() - sb[n].double()).norm() / sb[n].double().norm().clamp(min=1e-30))
        assert rel <= rtol, f"{n}: relative error {rel:.2e} > {rtol:.0e}"


def _assert_close_losses(a, b, rtol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=rtol)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    model = _model()
    res = MoETrainer(model, **OPTS).train(data, output_dir=str(out), **TRAIN)
    return model, res, out


@pytest.fixture(scope="module")
def ep2(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ep2")
    trainer = DistributedMoETrainer(_model(), world_size=2, expert_parallel_size=2, **OPTS)
    res = trainer.train(data, output_dir=str(out), **TRAIN)
    return trainer.model, res, out


def test_ep2_equals_single_process(reference, ep2):
    ref_model, ref, _ = reference
    model, res, out = ep2
    assert res.global_step == ref.global_step == STEPS
    _assert_close_losses(res.history["loss"], ref.history["loss"])
    _assert_close_models(model, ref_model)
    # the checkpoint on disk is the full model
    assert (out / "model" / "model.safetensors").exists()
    loaded = load_pretrained_moe(out / "model")
    _assert_close_models(loaded, ref_model)


def test_checkpoint_saved_at_ep2_resumes_at_ep1(data, ep2, tmp_path):
    _, res, out = ep2
    model = _model()
    resumed = MoETrainer(model, **OPTS).train(data, output_dir=str(tmp_path),
                                               resume_from=str(out / "checkpoints" / "step-000002"), **TRAIN)
    assert resumed.history["step"] == [3, 4]
    _assert_close_losses(resumed.history["loss"], res.history["loss"][2:])
    _assert_close_models(model, ep2[0])


def test_checkpoint_saved_at_ep1_resumes_at_ep2_dp2_on_four_workers(data, reference, tmp_path):
    # one Ray run for two things: a one-process checkpoint continues at another layout, and
    # EP 2 x DP 2 on 4 workers computes what one process computes (steps 3 and 4)
    ref_model, ref, out = reference
    trainer = DistributedMoETrainer(_model(), world_size=4, expert_parallel_size=2,
                                    resources_per_worker={"CPU": 0.5}, **OPTS)
    res = trainer.train(data, output_dir=str(tmp_path), resume_from=str(out / "checkpoints" / "step-000002"), **TRAIN)
    assert res.history["step"] == [3, 4]
    _assert_close_losses(res.history["loss"], ref.history["loss"][2:])
    _assert_close_models(trainer.model, ref_model)


@pytest.mark.slow
def test_streaming_with_ray_data(tmp_path):
    import math
    from collections import Counter

    import datasets

    from moe_lab.data import ByteTokenizer, prepare_moe_dataset, save_tokenizer
    from moe_lab.jobs import load_job
    from moe_lab.orchestration.data import CORPUS_SHARDS, builtin_shard, streaming_dataset

    spec = load_job(None, ["data.corpus_size_bytes=80000", "data.max_length=64"])
    save_tokenizer(ByteTokenizer(), tmp_path / "tok")
    # the stream's documents are the built-in shards; packed in the driver they give the expected blocks
    shards = datasets.concatenate_datasets([builtin_shard(spec, s) for s in range(CORPUS_SHARDS)])
    expected = Counter(tuple(ids) for ids in prepare_moe_dataset(shards, max_length=64, num_proc=1)["input_ids"])
    assert any(len(b) < 64 for b in expected)  # ragged tails: the collate must pad

    ds = streaming_dataset(spec, str(tmp_path / "tok"))  # 8 shard tasks; the dataset keeps their order
    per_rank = [Counter(b for batch in batches for b in _unpadded_blocks(batch, 64))
                for batches in _batches_per_rank(ds, 2, batch_size=16)]
    assert all(per_rank), "a rank got no batch"
    both = per_rank[0] + per_rank[1]
    # every block is a packed block of the corpus, and no block reaches the ranks more often than it
    # exists (some code/json blocks repeat): the two shards are disjoint
    assert both <= expected
    unique = {b for b, n in expected.items() if n == 1}
    assert len(unique) > 0.9 * len(expected) and not set(per_rank[0]) & set(per_rank[1]) & unique
    assert sum(both.values()) >= sum(expected.values()) - 2 * 16  # only drop_last / the equal split lose blocks

    # training on the stream with the experts sharded over the 2 workers (EP 2)
    model = _model(vocab_size=259)
    trainer = DistributedMoETrainer(model, world_size=2, expert_parallel_size=2, tokenizer=ByteTokenizer(), **OPTS)
    res = trainer.train(streaming_dataset(spec, str(tmp_path / "tok")), output_dir=str(tmp_path / "out"),
                        batch_size=8, learning_rate=1e-2, warmup_steps=1, max_steps=3, save_steps=100)
    assert res.global_step == 3 and all(math.isfinite(x) for x in res.history["loss"])
    assert 0 < res.total_tokens <= 3 * 8 * 64 and res.tokens_per_second > 0


def test_unsupported_parallel_sizes_fail_clearly(data, tmp_path):
    # model_parallel_size is tensor parallelism: the model must split over it
    with pytest.raises(DistributedError, match=r"vocab_size \(97\) must be divisible by model_parallel_size \(2\)"):
        DistributedMoETrainer(_model(), world_size=2, model_parallel_size=2)
    with pytest.raises(DistributedError, match=r"world_size \(3\) must be divisible by dp_shard \(1\) × "
                                               r"model_parallel_size \(2\)"):
        DistributedMoETrainer(_model(vocab_size=98), world_size=3, model_parallel_size=2)
    fsdp_tp = DistributedMoETrainer(_model(vocab_size=98), world_size=4, model_parallel_size=2, dp_shard=2)  # FSDP 2 x TP 2
    assert (fsdp_tp.dims.dp_shard, fsdp_tp.dims.tp, fsdp_tp.dims.dp) == (2, 2, 2)
    with pytest.raises(DistributedError, match=r"pipeline_parallel_size \(2\) > 1 with dp_shard \(2\) or "
                                               r"model_parallel_size \(1\) > 1 is not supported yet"):
        DistributedMoETrainer(_model(), world_size=4, pipeline_parallel_size=2, dp_shard=2)
    with pytest.raises(DistributedError, match=r"world_size \(3\) must be divisible by expert_parallel_size \(2\)"):
        DistributedMoETrainer(_model(), world_size=3, expert_parallel_size=2)
    with pytest.raises(DistributedError, match=r"num_experts \(4\) must be divisible by expert_parallel_size \(8\)"):
        DistributedMoETrainer(_model(), world_size=8, expert_parallel_size=8)
    with pytest.raises(DistributedError, match=r"batch_size \(5\) must be divisible"):
        DistributedMoETrainer(_model(), world_size=2, **OPTS).train(data, output_dir=str(tmp_path), batch_size=5)
    # TP 2 on 2 workers is one data-parallel rank: any batch size
    tp2 = DistributedMoETrainer(_model(vocab_size=98), world_size=2, model_parallel_size=2, **OPTS)
    assert tp2.dims.dp == 1


@pytest.mark.slow
def test_tp2_equals_single_process_and_saves_the_full_model(data, tmp_path):
    """model_parallel_size=2 is tensor parallelism (vocab-parallel loss, sequence-parallel
    norms): 3 steps on 2 workers equal one process, and the checkpoint is the full model.
    The batch of 5 rows is legal only if the workers run the TP layout (one data-parallel
    rank); as 2 data-parallel workers they would refuse it. Losses and gradient norms (which
    catch a wrongly scaled gradient that Adam's update would hide) match to 1e-5; the weights
    to 1e-4: TP reorders the sums of every sharded matmul, and Adam turns that fp32 noise in a
    near-cancelling gradient element into a single-element difference of ~1e-2 * lr."""
    train = dict(TRAIN, batch_size=5, max_steps=3, save_steps=100, eval_samples=16)
    held_out = data.select(range(16))  # evaluated after the last step, from the gathered logits
    ref_model = _model(vocab_size=98)
    ref = MoETrainer(ref_model, **OPTS).train(data, held_out, output_dir=str(tmp_path / "ref"), **train)
    trainer = DistributedMoETrainer(_model(vocab_size=98), world_size=2, model_parallel_size=2, **OPTS)
    res = trainer.train(data, held_out, output_dir=str(tmp_path / "tp2"), **train)
    assert res.global_step == 3
    _assert_close_losses(res.history["loss"] + [res.eval_loss], ref.history["loss"] + [ref.eval_loss])
    _assert_close_losses(res.history["grad_norm"], ref.history["grad_norm"])
    _assert_close_models(trainer.model, ref_model, rtol=1e-4)
    assert sorted(p.name for p in (tmp_path / "tp2" / "model").glob("model*.safetensors")) == ["model.safetensors"]
    _assert_close_models(load_pretrained_moe(tmp_path / "tp2" / "model"), trainer.model, rtol=0)


# ---------------------------------------------------------------------------------------
# Ray Data streaming: the same blocks as prepare_moe_dataset, and no eval document in training
# ---------------------------------------------------------------------------------------


def _batches_per_rank(ds, num_ranks, batch_size):
    """Collated batches of each rank, split as Ray Train splits a dataset (streaming_split, equal)."""
    import threading

    from moe_lab.orchestration.data import RayDataStream

    splits = ds.streaming_split(num_ranks, equal=True)
    out, errors = [[] for _ in splits], []

    def consume(rank):
        try:
            out[rank] = list(RayDataStream(splits[rank], batch_size, shuffle_buffer=None, pad_token_id=0).iter_epoch(0))
        except Exception as exc:  # re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in range(num_ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return out


def _unpadded_blocks(batch, max_length):
    """The blocks of one collated batch, with the padding checked and removed."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.dtype == torch.long and ids.shape == mask.shape == labels.shape and ids.shape[1] <= max_length
    lengths = mask.sum(1)
    assert torch.equal(mask, (torch.arange(ids.shape[1]) < lengths[:, None]).long())  # right padding
    assert torch.equal(labels, ids.masked_fill(mask == 0, -100))
    return [tuple(row[:n].tolist()) for row, n in zip(ids, lengths)]


def _write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _stream_rows(ds, label_column):
    rows = ds.take_all()
    assert all(set(r) == ({"input_ids", label_column} if label_column else {"input_ids"}) for r in rows)
    return [(tuple(int(i) for i in r["input_ids"]), r.get(label_column)) for r in rows]


def _local_rows(packed, label_column):
    labels = packed[label_column] if label_column else [None] * len(packed)
    return [(tuple(ids), label) for ids, label in zip(packed["input_ids"], labels)]


@pytest.fixture(scope="module")
def word_level_tokenizer_dir(tmp_path_factory):
    """A transformers tokenizer with no EOS token (only [PAD] and [UNK]), saved for the actors."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate("alpha beta gamma delta".split())}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    path = tmp_path_factory.mktemp("wordlevel")
    tok.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("tokenizer_kind, label_column", [("byte", "domain"), ("wordlevel", None)])
def test_streaming_blocks_equal_prepare_moe_dataset(tmp_path, word_level_tokenizer_dir, tokenizer_kind, label_column):
    from moe_lab.data import load_text_dataset, load_tokenizer, prepare_moe_dataset
    from moe_lab.data.pack import PACK_GROUP_ROWS
    from moe_lab.jobs import load_job
    from moe_lab.orchestration.data import streaming_dataset

    words = "alpha beta gamma delta".split()
    rows = [{"text": " ".join(words[(i + k) % 4] for k in range(i % 20 + 1)) + f" w{i}", "domain": "xyz"[i % 3]}
            for i in range(2 * PACK_GROUP_ROWS + 300)]  # three packing groups
    for i in (5, 1200, 2100):
        rows[i]["text"] = "   " if i % 2 else ""  # no usable text: must not shift the groups
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    evalf = _write_jsonl(tmp_path / "eval.jsonl", [{"text": "held out eval text", "domain": "x"}])
    tok_spec = "byte" if tokenizer_kind == "byte" else str(word_level_tokenizer_dir)
    spec = load_job(None, [f"data.dataset={train}", f"data.eval_dataset={evalf}", "data.max_length=16",
                           f"data.label_column={label_column or 'null'}"])

    local = prepare_moe_dataset(load_text_dataset(train, cache_dir=tmp_path / "cache"), load_tokenizer(tok_spec),
                                max_length=16, num_proc=1, label_column=label_column)
    streamed = _stream_rows(streaming_dataset(spec, tok_spec), label_column)
    assert sorted(streamed, key=repr) == sorted(_local_rows(local, label_column), key=repr)
    assert any(len(ids) < 16 for ids, _ in streamed)  # short blocks (tails / short documents) are kept
    if tokenizer_kind == "wordlevel":  # no EOS: one truncated block per document, no packing
        assert len(streamed) == len(rows) - 3


def test_streaming_never_trains_on_eval_documents(tmp_path):
    from moe_lab.data import ByteTokenizer, load_text_dataset, prepare_moe_dataset, save_tokenizer, train_eval_split
    from moe_lab.jobs import load_job
    from moe_lab.orchestration.data import held_out_documents, streaming_dataset
    from moe_lab.orchestration.train import _bpe_sample, _streaming_eval

    tok = ByteTokenizer()
    save_tokenizer(tok, tmp_path / "tok")
    docs = [f"<doc{i}> " + "lorem ipsum " * (i % 5) + f"</doc{i}>" for i in range(300)]
    data = _write_jsonl(tmp_path / "data.jsonl", [{"text": t, "domain": "ab"[i % 2]} for i, t in enumerate(docs)])
    spec = load_job(None, [f"data.dataset={data}", "data.max_length=64", "data.eval_fraction=0.1", "data.streaming=true"])

    eval_docs = set(held_out_documents(spec)["text"])
    assert len(eval_docs) == 30  # stratified: 15 per domain
    # the eval set the job evaluates on is exactly the held-out documents
    assert _documents(_local_rows(_streaming_eval(spec, tok), "domain"), tok) == eval_docs

    rows = _stream_rows(streaming_dataset(spec, str(tmp_path / "tok")), "domain")
    trained = _documents(rows, tok)
    assert not trained & eval_docs, f"eval documents in the training stream: {sorted(trained & eval_docs)[:3]}"
    assert trained == set(docs) - eval_docs  # and every training document is there
    # the same blocks as the non-streaming job's training split
    local_train, _ = train_eval_split(load_text_dataset(data, cache_dir=tmp_path / "cache"), 0.1, spec.data.corpus_seed)
    local = prepare_moe_dataset(local_train, tok, max_length=64, num_proc=1)
    assert sorted(rows, key=repr) == sorted(_local_rows(local, "domain"), key=repr)
    # a BPE tokenizer of the job is trained on training documents only
    assert set(_bpe_sample(spec, held_out_documents(spec))) == set(docs) - eval_docs


def test_streaming_builtin_bpe_sample_holds_no_eval_document():
    from moe_lab.jobs import load_job
    from moe_lab.orchestration.data import held_out_documents
    from moe_lab.orchestration.train import _bpe_sample

    spec = load_job(None, ["data.corpus_size_bytes=80000", "data.streaming=true", "data.tokenizer=bpe"])
    eval_docs = set(held_out_documents(spec)["text"])
    sample = _bpe_sample(spec, held_out_documents(spec))
    assert len(sample) >= 50 and eval_docs and not eval_docs & set(sample)


def _documents(rows, tok):
    """The documents in (block, label) rows of ONE packing group: each label's blocks, in order,
    are its document stream; split it at eos (a stream's last eos may be a dropped lone tail)."""
    docs = set()
    for label in {label for _, label in rows}:
        current = []
        for i in [i for ids, lab in rows if lab == label for i in ids] + [tok.eos_token_id]:
            if i == tok.eos_token_id:
                if current:
                    docs.add(tok.decode(current))
                current = []
            else:
                current.append(i)
    return docs


# last in the module: the Ray Train run after this one, on the same cluster, lost its workers in
# three CI runs on 2026-12-01 (a placement group removed at start-up, then a failed health check)
def test_killed_worker_resumes_from_latest_checkpoint(data, reference, tmp_path):
    """FSDP 2 x EP 2 on 2 workers, rank 1 SIGKILLed at step 3: Ray restarts the workers, they
    resume from the step-2 checkpoint (sharded, torch.distributed.checkpoint: each rank loads
    its own pieces of model and optimizer) and end with the weights of an uninterrupted
    one-process run."""
    marker = tmp_path / "killed"

    class KillRank1Once:
        """SIGKILL the rank-1 worker process at step 3, the first time only, once Ray Train has
        registered the step-2 checkpoint (its controller registers reports every ~2 s and
        then writes its snapshot file; a worker killed before that restarts from scratch)."""

        def __init__(self, marker_path, storage):
            self.marker, self.storage = str(marker_path), str(storage)

        def __call__(self, record):
            import time

            import ray.train

            if record["step"] == 3 and ray.train.get_context().get_world_rank() == 1 and not os.path.exists(self.marker):
                deadline = time.monotonic() + 60
                while not list(Path(self.storage).glob("*/checkpoint_manager_snapshot.json")) and time.monotonic() < deadline:
                    time.sleep(0.1)
                Path(self.marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)

    ref_model, ref, _ = reference
    trainer = DistributedMoETrainer(_model(), world_size=2, expert_parallel_size=2, dp_shard=2, max_failures=1,
                                    callbacks=[KillRank1Once(marker, tmp_path / "run" / "ray")], **OPTS)
    res = trainer.train(data, output_dir=str(tmp_path / "run"), **TRAIN)
    assert marker.exists(), "the worker was never killed"
    assert res.global_step == STEPS
    assert res.history["step"] == [3, 4], "the restarted workers did not resume from step 2"
    _assert_close_losses(res.history["loss"], ref.history["loss"][-2:])
    _assert_close_models(trainer.model, ref_model)
    ckpts = tmp_path / "run" / "checkpoints"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")], "half-written checkpoint left behind"
    assert is_sharded_checkpoint(ckpts / "step-000002"), sorted(p.name for p in (ckpts / "step-000002").iterdir())
    load_pretrained_moe(ckpts / "step-000002")  # consolidated transparently
