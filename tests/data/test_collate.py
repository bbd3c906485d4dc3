"""Tests of collate_moe_batch."""

import pytest
import torch

from moe_lab.constants import IGNORE_INDEX
from moe_lab.data import collate_moe_batch
from moe_lab.data.prepare import collate_moe_batch as collate_from_prepare
from moe_lab.errors import ConfigError, InputError


def test_single_row():
    out = collate_moe_batch([{"input_ids": [5, 6, 7]}])
    assert out["input_ids"].tolist() == [[5, 6, 7]]
    assert out["attention_mask"].tolist() == [[1, 1, 1]]
    assert out["labels"].tolist() == [[5, 6, 7]]
    assert all(out[k].dtype == torch.int64 for k in ("input_ids", "attention_mask", "labels"))


def test_different_lengths_are_right_padded():
    out = collate_moe_batch([{"input_ids": [1, 2]}, {"input_ids": [3, 4, 5, 6]}], pad_token_id=9)
    assert out["input_ids"].tolist() == [[1, 2, 9, 9], [3, 4, 5, 6]]  # [batch, seq]
    assert out["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert out["labels"].tolist() == [[1, 2, IGNORE_INDEX, IGNORE_INDEX], [3, 4, 5, 6]]


def test_real_pad_id_tokens_are_not_masked():
    out = collate_moe_batch([{"input_ids": [0, 0]}, {"input_ids": [0]}], pad_token_id=0)
    assert out["labels"].tolist() == [[0, 0], [0, IGNORE_INDEX]]


def test_label_passthrough_and_tensor_rows():
    batch = [
        {"input_ids": torch.tensor([1, 2, 3], dtype=torch.int32), "domain": "code"},
        {"input_ids": [4], "domain": "dna"},
    ]
    out = collate_moe_batch(batch)
    assert out["domain"] == ["code", "dna"]
    assert out["input_ids"].dtype == torch.int64
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]


def test_max_length_truncates():
    out = collate_moe_batch([{"input_ids": list(range(10))}, {"input_ids": [1, 2]}], max_length=4)
    assert out["input_ids"].shape == (2, 4)
    assert out["input_ids"][0].tolist() == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="max_length"):
        collate_moe_batch([{"input_ids": [1]}], max_length=0)


def test_errors():
    with pytest.raises(InputError, match="non-empty"):
        collate_moe_batch([])
    with pytest.raises(InputError, match="row 1"):
        collate_moe_batch([{"input_ids": [1]}, {"input_ids": []}])
    with pytest.raises(InputError, match="input_ids"):
        collate_moe_batch([{"text": "abc"}])
    with pytest.raises(InputError, match="1-D"):
        collate_moe_batch([{"input_ids": [[1, 2]]}])
    with pytest.raises(InputError, match="ints"):
        collate_moe_batch([{"input_ids": [1.5, 2.0]}])


def test_works_as_dataloader_collate_fn():
    from moe_lab.data import prepare_moe_dataset

    packed = prepare_moe_dataset({"text": ["abcdef", "xyz"], "domain": ["a", "b"]}, max_length=4)
    loader = torch.utils.data.DataLoader(packed, batch_size=8, collate_fn=collate_moe_batch)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (len(packed), 4)
    assert sorted(batch["domain"]) == sorted(packed["domain"])
    assert collate_from_prepare is collate_moe_batch
