"""``ParallelDims`` is validated once, with errors that name the values; the world mesh's
shape puts expert parallelism inside the data-parallel ranks (torchtitan's layout)."""

import pytest
from helpers import tiny_config

from moe_lab import DistributedError
from moe_lab.parallel import ParallelDims, model_problems


def test_resolve_fills_dp_replicate_and_builds_the_mesh_shape():
    dims = ParallelDims(dp_shard=2, ep=2).resolve(4)
    assert (dims.dp_replicate, dims.dp, dims.efsdp) == (2, 4, 1)
    assert dims.mesh_shape == (1, 2, 1, 2, 1)  # pp, rep, efsdp, ep, tp
    dims = ParallelDims(dp_shard=4, ep=2).resolve(4)
    assert (dims.dp_replicate, dims.efsdp, dims.mesh_shape) == (1, 2, (1, 1, 2, 2, 1))
    dims = ParallelDims(tp=2, ep=2).resolve(8)  # 4 data-parallel ranks, plain replication
    assert (dims.dp_replicate, dims.dp, dims.mesh_shape) == (4, 4, (1, 2, 1, 2, 2))
    assert ParallelDims().resolve(3).dp == 3 and not ParallelDims().resolve(3).sharded
    dims = ParallelDims(dp_shard=2, tp=2, ep=2).resolve(4)  # FSDP 2 x TP 2, experts over the dp_shard ranks
    assert (dims.dp_replicate, dims.dp, dims.efsdp, dims.mesh_shape) == (1, 2, 1, (1, 1, 1, 2, 2))


@pytest.mark.parametrize("dims, world, message", [
    (ParallelDims(dp_shard=2, pp=2), 6, r"world_size \(6\) must be divisible by dp_shard \(2\) × tp \(1\) × pp \(2\) = 4"),
    (ParallelDims(dp_replicate=2, dp_shard=2), 8, r"world_size \(8\) must equal dp_replicate \(2\) × dp_shard \(2\)"),
    (ParallelDims(dp_shard=6, ep=4), 6, r"dp_shard \(6\) must be divisible by ep \(4\)"),
    (ParallelDims(ep=4), 6, r"ep \(4\) must divide the data-parallel ranks: dp_replicate \(6\)"),
    (ParallelDims(tp=0), 2, r"tp must be a positive int, got 0"),
    (ParallelDims(dp_replicate=0), 2, r"dp_replicate must be a positive int or -1"),
    (ParallelDims(pp=True), 2, r"pp must be a positive int, got True"),
    (ParallelDims(pp=2, tp=2), 4, r"pp \(2\) > 1 with dp_shard \(1\) or tp \(2\) > 1 is not supported yet"),
    (ParallelDims(pp=2, pp_schedule="zb"), 2, r"pp_schedule \('zb'\) must be one of \['1f1b', 'gpipe', 'interleaved_1f1b'\]"),
])
def test_bad_dims_name_the_values(dims, world, message):
    with pytest.raises(DistributedError, match=message):
        dims.resolve(world)


def test_model_problems_name_the_config_values():
    cfg = tiny_config(num_experts=6, num_attention_heads=4, vocab_size=97)
    problems = model_problems(ParallelDims(ep=4, tp=2), cfg, prefix="model.", dim_prefix="scaling.")
    assert "model.num_experts (6) must be divisible by scaling.ep (4)" in problems
    assert "model.vocab_size (97) must be divisible by scaling.tp (2)" in problems
    assert not [p for p in problems if "num_attention_heads" in p]
    with pytest.raises(DistributedError, match=r"num_experts \(6\) must be divisible by ep \(4\)"):
        ParallelDims(ep=4).check_model(cfg)
    assert model_problems(ParallelDims(pp=3), tiny_config(num_layers=2)) == [  # checked once pp is built
        "num_layers (2) must be at least pp (3)"]
    assert model_problems(ParallelDims(tp=2), tiny_config(vocab_size=96, qk_norm=True))[0].startswith(
        "qk_norm is not supported with tp (2) > 1")
    assert model_problems(ParallelDims(dp_shard=2, ep=2), tiny_config()) == []
