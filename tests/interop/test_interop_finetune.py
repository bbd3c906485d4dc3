"""An imported Mixtral fine-tunes in moe_lab with the tokenizer it came with."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from moe_lab import MoEModel, import_hf_mixtral  # noqa: E402
from moe_lab.data import ByteTokenizer, load_tokenizer  # noqa: E402
from moe_lab.interop import save_hf_tokenizer  # noqa: E402
from moe_lab.training import MoETrainer  # noqa: E402
from moe_lab.checkpoint import load_pretrained_moe  # noqa: E402

TEXT = ["12 + 5 = 17\n3 + 4 = 7\nthe cat sat on the mat\n" * 3] * 16


def _finetune(model, tok, out, steps=8):
    trainer = MoETrainer(model, tokenizer=tok, mixed_precision=False, progress_bar=False, tensorboard=False,
                         max_length=32, logging_steps=1)
    return trainer.train(TEXT, num_epochs=4, batch_size=4, learning_rate=3e-3, warmup_steps=1,
                         output_dir=str(out), max_steps=steps)


@pytest.mark.parametrize("tokenizer_kind", ["ours", "transformers"])
def test_imported_mixtral_finetunes_with_its_tokenizer(tmp_path, tiny_mixtral, tokenizer_kind):
    path, hf = tiny_mixtral(tmp_path, vocab_size=259)
    save_hf_tokenizer(ByteTokenizer(), path)
    if tokenizer_kind == "transformers":  # a tokenizer moe_lab did not write: it loads through AutoTokenizer
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        del cfg["moe_lab_tokenizer_class"]
        (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    model, tok = import_hf_mixtral(path, out=tmp_path / "imported")
    assert isinstance(model, MoEModel)
    assert isinstance(tok, ByteTokenizer) == (tokenizer_kind == "ours")
    assert tok.encode("héllo") == list("héllo".encode())
    # the saved moe_lab checkpoint carries the tokenizer too
    assert load_tokenizer(tmp_path / "imported").encode("héllo") == list("héllo".encode())
    before = [p.detach().clone() for p in model.parameters()]
    result = _finetune(load_pretrained_moe(tmp_path / "imported"), tok, tmp_path / "run")
    losses = result.history["loss"]
    assert result.global_step == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses  # it learns
    tuned = load_pretrained_moe(result.checkpoint_path)
    assert any(not torch.equal(a, b) for a, b in zip(before, tuned.parameters()))
