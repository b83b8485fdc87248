"""bf16, the default precision, on CPU (DeepSpeed bf16): adapt, distill and sft train in it, and gradient
accumulation is exact within bf16 tolerance against one large micro batch. (Resume under bf16 is bitwise:
tests/test_resume_everywhere.py.)

References: the same config and seed in fp32 (bf16 must stay close to it, yet differ, or it did not run in
bf16), and a hand computation of step 1 in fp32 with plain HF.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_resume_everywhere import _distill, _one_thread, _rows, _sft, _weights, inputs  # noqa: F401
from test_train_engine import base_cfg, model_dir, reference_step1, train_inprocess  # noqa: F401

from minima.core.config import AdaptConfig
from minima.train.metrics import read_metrics

BF16_REL = 3e-2  # bf16 has 8 mantissa bits: relative rounding 2^-8 per op, a few % over a forward


def _adapt(p, out, **kw):
    base = dict(
        model=str(p["teacher"]),
        records=str(p["lm"]),
        out_dir=str(out),
        precision="fp32",
        zero_stage=0,
        micro_batch_size=4,
        max_steps=4,
        lr=1e-3,
        log_steps=1,
    )
    return AdaptConfig(**{**base, **kw})


def _stage_run(cfg):
    from minima.stages import adapt, distill, sft

    return {"adapt": adapt, "distill": distill, "sft": sft}[type(cfg).stage].run(cfg)


STAGES = {
    "adapt": lambda p, out, **kw: _adapt(p, out, **kw),
    "distill": lambda p, out, **kw: _distill(p, out, max_steps=4, save_steps=0, **kw),
    "sft": lambda p, out, **kw: _sft(p, out, max_steps=4, save_steps=0, eval_steps=0, **kw),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_trains_in_bf16(stage, inputs, tmp_path):  # noqa: F811
    """precision=bf16 trains (DeepSpeed bf16, ZeRO-2 on CPU): its losses follow the fp32 run's within bf16
    rounding but are not the fp32 numbers, the manifest says bf16, and the export loads and moved."""
    from transformers import AutoModelForCausalLM

    make = STAGES[stage]
    ref = _stage_run(make(inputs, tmp_path / "fp32", zero_stage=2))
    art = _stage_run(make(inputs, tmp_path / "bf16", precision="bf16", zero_stage=2))
    assert art.metrics["precision"] == "bf16" and ref.metrics["precision"] == "fp32"
    got, want = _rows(art.path), _rows(ref.path)
    assert [r["step"] for r in got] == [1, 2, 3, 4] and [r["batch_hash"] for r in got] == [
        r["batch_hash"] for r in want
    ]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=BF16_REL), (a["step"], a["loss"], b["loss"])
    assert [r["loss"] for r in got] != [r["loss"] for r in want]  # the forward really ran in bf16
    cfg = json.loads((art.path / "config.json").read_text())
    print(f"{stage}: bf16 losses {[round(r['loss'], 4) for r in got]}, fp32 {[round(r['loss'], 4) for r in want]}")
    model = AutoModelForCausalLM.from_pretrained(str(art.path))
    assert model.config.model_type == cfg["model_type"]
    init = _weights(inputs["student"] if stage == "distill" else inputs["teacher"])
    out = _weights(art.path)
    moved = [k for k in out if k in init and not torch.equal(init[k].float(), out[k].float())]
    assert len(moved) > len(out) // 2


def test_gradient_accumulation_exact_in_bf16(model_dir, tmp_path):  # noqa: F811
    """bf16: 8 x 1 == 2 x 4 within bf16 rounding: step-1 loss and grad norm equal the fp32 hand computation
    within tolerance, and the per-step losses, grad norms and final weights of the two runs agree.

    The tolerances are checked to be tighter than the errors accumulation bugs make: a per-micro-batch mean
    (variable lengths, masked prefixes) and a gradient scaled by the accumulation twice."""
    from minima.train.synthetic import SyntheticDataset, pad_collate

    kw = dict(precision="bf16", zero_stage=2, max_steps=4)
    _, w8 = train_inprocess(base_cfg(model_dir, tmp_path / "mb8", **kw))
    _, w2 = train_inprocess(
        base_cfg(model_dir, tmp_path / "mb2", micro_batch_size=2, gradient_accumulation_steps=4, **kw)
    )
    ref_loss, ref_norm = reference_step1(model_dir, base_cfg(model_dir, tmp_path / "x"))
    m8 = [r for r in read_metrics(w8 / "metrics.jsonl") if r["split"] == "train"]
    m2 = [r for r in read_metrics(w2 / "metrics.jsonl") if r["split"] == "train"]
    assert len(m8) == len(m2) == 4
    step1_rel = 7e-5  # the loss and its log-softmax are fp32 over bf16 logits: step 1 is within ~3e-5
    for m in (m8[0], m2[0]):
        assert m["loss"] == pytest.approx(ref_loss, rel=step1_rel)
        assert m["grad_norm"] == pytest.approx(ref_norm, rel=BF16_REL)
    for a, b in zip(m8, m2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-2)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=BF16_REL)
    a, b = _weights(w8), _weights(w2)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 2e-2

    # the bugs the tolerances must catch: a mean of the 4 micro-batch means, a grad norm halved or doubled
    from transformers import AutoModelForCausalLM

    from minima.train import causal_lm_loss_sum

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    it = iter(SyntheticDataset(256, 32, 128, 0, 0, 1, True))
    batch = [next(it) for _ in range(8)]
    with torch.no_grad():
        means = []
        for i in range(0, 8, 2):
            mb = pad_collate(batch[i : i + 2])
            s, n = causal_lm_loss_sum(
                model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits, mb["labels"]
            )
            means.append((s / n).item())
    wrong = sum(means) / 4
    print(
        f"step 1: loss {ref_loss:.5f} (per-micro-batch mean {wrong:.5f}), bf16 {m8[0]['loss']:.5f} {m2[0]['loss']:.5f}"
    )
    assert abs(wrong - ref_loss) > 1.5 * step1_rel * ref_loss
