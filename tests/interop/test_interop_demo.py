"""The "done when" flow: a trained demo checkpoint exports, runs in transformers with equal
logits, and comes back bitwise (the README's commands, via the same functions)."""

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from moe_lab.cli import app  # noqa: E402
from moe_lab.data import ByteTokenizer  # noqa: E402
from moe_lab.jobs import load_job  # noqa: E402
from moe_lab.runner import run_job_local  # noqa: E402
from moe_lab.checkpoint import load_pretrained_moe  # noqa: E402


@pytest.mark.slow
def test_demo_checkpoint_exports_runs_in_transformers_and_comes_back(tmp_path):
    # the default (demo) job, shortened: small corpus, a few steps
    spec = load_job(None, [
        "data.corpus_size_bytes=60000", "data.num_proc=1", "training.max_steps=6", "training.eval_steps=6",
        "training.save_steps=6", "training.logging_steps=2", "training.eval_samples=16", "training.batch_size=8",
        "training.progress_bar=false",
    ])
    summary = run_job_local(spec, str(tmp_path / "demo"))
    ckpt = tmp_path / "demo" / "model"
    assert summary["global_step"] == 6 and (ckpt / "model.safetensors").is_file()

    res = CliRunner().invoke(app, ["export", str(ckpt), "--format", "hf-mixtral", "--out", str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output

    ours = load_pretrained_moe(ckpt).eval()
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = ["12 + 5 = 17", "def add(a, b):\n    return a + b", "héllo wörld"]
    assert [tok.encode(t) for t in texts] == [ByteTokenizer().encode(t) for t in texts]
    batch = tok(texts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = hf(ids, attention_mask=mask).logits  # right padding: positions agree without help
    real = mask.bool()
    assert (a - b).abs()[real].max() < 1e-4
    # greedy generation agrees token for token
    prompt = torch.tensor([ByteTokenizer().encode("12 + 5 =")])
    with torch.no_grad():
        hf_out = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=256)[0, prompt.shape[1]:]
        from moe_lab.inference import generate

        ours_out = generate(ours, prompt, max_new_tokens=8, do_sample=False, eos_token_id=258, pad_token_id=256)
    ours_new = ours_out[0, prompt.shape[1]:].tolist()
    assert len(hf_out) >= 1 and hf_out.tolist() == ours_new[: len(hf_out)]

    back = load_pretrained_moe(tmp_path / "hf")
    assert back.config == ours.config
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
