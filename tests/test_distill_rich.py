"""Richer distillation: the generalized JSD against TRL and by hand, hidden-state KD (zero for an identical
student, a hand computation, the projection trained and exported away), on-policy batches (reproducible,
logged) under both strategies."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from _distill_pair import distill_cfg, first_batch, one_process_ctx

from minima.core.errors import ConfigError
from minima.train.objectives.kd import dense_loss, kd_reference

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
STUDENT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_inprocess):
    yield


# ------------------------------------------------------------------------------ generalized JSD
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_equals_trl_generalized_jsd(beta):
    """Value and gradient equal TRL's GKDTrainer.generalized_jsd_loss (batchmean over the label tokens)."""
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    g = torch.Generator().manual_seed(int(beta * 10))
    s = (3 * torch.randn(2, 5, 37, generator=g, dtype=torch.float64)).requires_grad_()
    t = 3 * torch.randn(2, 5, 37, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 37, (2, 5), generator=g)
    labels[0, :2] = -100
    ref = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=beta)
    (g_ref,) = torch.autograd.grad(ref, s)
    _, kd = dense_loss(s.reshape(-1, 37), labels.reshape(-1), t.reshape(-1, 37), "jsd", chunk=8, beta=beta)
    ours = kd.sum() / (labels != -100).sum()
    (g_ours,) = torch.autograd.grad(ours, s)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-9, abs=1e-12)
    assert torch.allclose(g_ours, g_ref, rtol=1e-7, atol=1e-10)


def test_jsd_by_hand_at_the_limits_and_the_middle():
    """beta 0 = KL(p||q), beta 1 = KL(q||p), beta 0.5 = the plain JSD, on a 3-token example computed by hand."""
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    fwd = sum(p[i] * math.log(p[i] / q[i]) for i in range(3))
    rev = sum(q[i] * math.log(q[i] / p[i]) for i in range(3))
    m = [(p[i] + q[i]) / 2 for i in range(3)]
    js = 0.5 * sum(p[i] * math.log(p[i] / m[i]) for i in range(3)) + 0.5 * sum(
        q[i] * math.log(q[i] / m[i]) for i in range(3)
    )
    b = 0.2
    mb = [b * p[i] + (1 - b) * q[i] for i in range(3)]
    gj = b * sum(p[i] * math.log(p[i] / mb[i]) for i in range(3)) + (1 - b) * sum(
        q[i] * math.log(q[i] / mb[i]) for i in range(3)
    )
    s, t, lab = q.log()[None], p.log()[None], torch.zeros(1, dtype=torch.long)
    for beta, want in ((0.0, fwd), (1.0, rev), (0.5, js), (b, gj)):
        _, kd = dense_loss(s, lab, t, "jsd", beta=beta)
        assert kd.item() == pytest.approx(float(want), rel=1e-12)
        assert kd_reference(s, t, "jsd", beta=beta).item() == pytest.approx(float(want), rel=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_cached_full_vocab_jsd_equals_dense(beta):
    """Cached top-k targets at k = vocab give the dense generalized JSD (value and gradient) for any beta."""
    from minima.train.objectives.kd import sparse_loss, top_k_targets

    g = torch.Generator().manual_seed(1)
    s = (2 * torch.randn(6, 29, generator=g, dtype=torch.float64)).requires_grad_()
    t = 2 * torch.randn(6, 29, generator=g, dtype=torch.float64)
    lab = torch.randint(0, 29, (6,), generator=g)
    _, kd_d = dense_loss(s, lab, t, "jsd", temperature=1.5, beta=beta)
    _, kd_s = sparse_loss(s, lab, top_k_targets(t, 29, temperature=1.5), "jsd", 1.5, beta=beta)
    (gd,) = torch.autograd.grad(kd_d.sum(), s)
    (gs,) = torch.autograd.grad(kd_s.sum(), s)
    assert torch.allclose(kd_s, kd_d, rtol=1e-6, atol=1e-9) and torch.allclose(gs, gd, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------------ a tiny pair
@pytest.fixture(scope="module")
def setup(tmp_path_factory, demo_data_dir, tiny_tokenizer_dir):
    """Tiny lm records (seq 32), a 4-layer teacher (width 64) and a 2-layer student (width 48) of its vocab."""
    from minima.testing import lm_records_from_lines, save_tiny_model

    d = tmp_path_factory.mktemp("distill_rich")
    rec = lm_records_from_lines(d, demo_data_dir / "text" / "pretrain_en.txt", tiny_tokenizer_dir, 200)
    teacher = save_tiny_model(d / "teacher", tiny_tokenizer_dir, seed=0, **SHAPE)
    student = save_tiny_model(d / "student", tiny_tokenizer_dir, seed=1, **STUDENT)
    return d, teacher, student, rec


def _recipe(cfg):
    from transformers import AutoModelForCausalLM

    from minima.stages.distill import DistillRecipe

    recipe = DistillRecipe(cfg)
    recipe.teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher).eval()
    return recipe


# ------------------------------------------------------------------------------ hidden states
@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_term_zero_for_a_student_equal_to_the_teacher(setup, kind):
    from minima.stages.distill import PROJECTION

    cfg = distill_cfg(setup, student=str(setup[1]), loss={"alpha": 0.0, "hidden_weight": 1.0, "hidden_kind": kind})
    recipe = _recipe(cfg)
    student = recipe.build_model(one_process_ctx())
    assert recipe.layer_map == {1: 1, 2: 2, 3: 3, 4: 4}
    out = recipe.compute_loss(student, first_batch(setup), one_process_ctx(), train=True)
    assert not hasattr(student, PROJECTION)
    assert abs(out.metrics["hidden"].item()) < 1e-6 and abs(out.metrics["kd"].item()) < 1e-5


def test_hidden_term_equals_a_hand_computation(setup):
    """Projected student states vs teacher states on the uniform map {1: 2, 2: 4}, mse over the width,
    averaged over the layers, summed over label positions; the loss adds it with its weight."""
    from transformers import AutoModelForCausalLM

    from minima.stages.distill import PROJECTION

    w = 0.7
    cfg = distill_cfg(setup, loss={"alpha": 0.5, "hidden_weight": w})
    recipe = _recipe(cfg)
    student = AutoModelForCausalLM.from_pretrained(cfg.student)
    recipe.layer_map = {1: 2, 2: 4}
    from minima.train.objectives.kd import HiddenProjection, uniform_layer_map

    assert uniform_layer_map(2, 4) == recipe.layer_map
    proj = HiddenProjection([1, 2], 48, 64)
    with torch.no_grad():
        for m in proj.maps.values():
            m.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    setattr(student, PROJECTION, proj)
    batch = first_batch(setup)
    out = recipe.compute_loss(student, batch, one_process_ctx(), train=True)

    with torch.no_grad():
        hs = student(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
        ht = recipe.teacher(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = batch["labels"][:, 1:] != -100
    total = 0.0
    for i, j in ((1, 2), (2, 4)):
        wmat = proj.maps[str(i)].weight.detach()
        for r, c in keep.nonzero().tolist():
            diff = hs[i][r, c] @ wmat.T - ht[j][r, c]
            total += float((diff * diff).sum()) / 64 / 2
    assert out.metrics["hidden"].item() == pytest.approx(total, rel=1e-5)
    want = 0.5 * out.metrics["ce"] + 0.5 * out.metrics["kd"] + w * out.metrics["hidden"]
    assert out.loss_sum.item() == pytest.approx(want.item(), rel=1e-6)
    grads = torch.autograd.grad(out.loss_sum, list(proj.parameters()))
    assert all(g.abs().sum() > 0 for g in grads)  # the projection trains with the student


def test_cached_logits_refuse_hidden_and_on_policy(setup):
    from minima.stages.distill import validate_inputs

    for loss in ({"hidden_weight": 1.0}, {"on_policy_fraction": 0.5}):
        with pytest.raises(ConfigError, match="live teacher"):
            validate_inputs(distill_cfg(setup, cache_logits=True, loss=loss))
    with pytest.raises(ConfigError, match="hidden_layers"):
        validate_inputs(distill_cfg(setup, loss={"hidden_weight": 1.0, "hidden_layers": {1: 5}}))


# ------------------------------------------------------------------------------ on-policy
def test_on_policy_sampling_is_reproducible(setup):
    """Same seed: the same samples and the same loss; another seed: other samples."""
    from transformers import AutoModelForCausalLM

    from minima.train.objectives.onpolicy import sample_continuations

    student = AutoModelForCausalLM.from_pretrained(str(setup[2]))
    prefix = first_batch(setup)["input_ids"][:, :8]
    a = sample_continuations(student, prefix, 12, 1.0, seed=5)
    b = sample_continuations(student, prefix, 12, 1.0, seed=5)
    c = sample_continuations(student, prefix, 12, 1.0, seed=6)
    assert a.shape == (3, 20) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :8], prefix)

    cfg = distill_cfg(setup, loss={"alpha": 0.5, "kd": "jsd", "on_policy_fraction": 1.0, "on_policy_tokens": 12})
    losses = []
    for _ in range(2):
        recipe = _recipe(cfg)
        recipe.begin_step(0)
        batch = first_batch(setup)
        n = recipe.count_tokens(batch)
        out = recipe.compute_loss(student, batch, one_process_ctx(), train=True)
        assert n == int(out.num_tokens) == 3 * 12
        assert out.metrics["on_policy"].item() == n and out.loss_sum.item() == pytest.approx(
            0.5 * out.metrics["kd"].item()
        )
        losses.append(out.loss_sum.item())
    assert losses[0] == losses[1]


def _train_rows(path):
    from minima.train.metrics import read_metrics

    return [r for r in read_metrics(Path(path) / "metrics.jsonl") if r.get("split") == "train"]


def _export_keys(path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            keys |= set(sf.keys())
    return keys


def test_tiny_run_hidden_and_on_policy_under_both_strategies(setup, tmp_path):
    """lambda = 0.5 with jsd and a hidden term: both strategies log the same kd, hidden and on-policy share
    (the share the seeded draws predict), and the export is the plain student without the projection."""
    from transformers import AutoModelForCausalLM

    from minima.stages.distill import run
    from minima.train.objectives.onpolicy import is_on_policy

    loss = {"alpha": 0.5, "kd": "jsd", "jsd_beta": 0.3, "hidden_weight": 0.5, "on_policy_fraction": 0.5}
    loss["on_policy_tokens"] = 8
    rows = {}
    for strategy in ("deepspeed", "fsdp"):
        cfg = distill_cfg(
            setup, strategy=strategy, loss=loss, gradient_accumulation_steps=2, out_dir=str(tmp_path / strategy)
        )
        art = run(cfg)
        rows[strategy] = _train_rows(art.path)
        keys = _export_keys(art.path)
        assert keys and not any("kd_hidden_proj" in k for k in keys)
        ref = AutoModelForCausalLM.from_pretrained(str(setup[2]))
        assert set(ref.state_dict()) >= keys
        assert json.loads((art.path / "config.json").read_text())["hidden_size"] == 48
    for a, b in zip(rows["deepspeed"], rows["fsdp"]):
        for key in ("loss", "kd", "ce", "hidden", "on_policy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    # the share of on-policy label tokens each step, from the seeded draws (8 tokens a row when on-policy)
    shares = []
    for step, r in enumerate(rows["fsdp"]):
        on = [is_on_policy(0, step, m, 0.5) for m in range(2)]
        assert r["hidden"] > 0
        shares.append((sum(on), r["on_policy"]))
        if all(on):
            assert r["on_policy"] == pytest.approx(1.0)
        elif not any(on):
            assert r["on_policy"] == 0.0
        else:
            assert 0.0 < r["on_policy"] < 1.0
    assert any(s[0] > 0 for s in shares) and any(s[0] < 2 for s in shares), shares


@pytest.mark.slow
def test_two_ranks_hidden_and_on_policy_fsdp_matches_deepspeed(setup, tmp_path):
    """Two gloo ranks: FSDP (the projection sharded with the student's root) and DeepSpeed train the same
    hidden + on-policy losses step by step (the ranks decide on-policy together and generate in lockstep)."""
    loss = {"alpha": 0.5, "kd": "jsd", "hidden_weight": 0.5, "on_policy_fraction": 0.5, "on_policy_tokens": 8}
    rows = {}
    for strategy in ("deepspeed", "fsdp"):
        cfg = distill_cfg(
            setup, strategy=strategy, loss=loss, max_steps=3, micro_batch_size=2, out_dir=str(tmp_path / strategy)
        )
        cfg.launch.nproc_per_node = 2
        cfg.launch.master_port = 29500 + (os.getpid() + len(rows)) % 1000
        from minima.stages.distill import run

        art = run(cfg)
        assert art.metrics["world_size"] == 2
        rows[strategy] = _train_rows(art.path)
        assert _export_keys(art.path) == _export_keys(setup[2])  # the student's tensors, no projection
    assert any(r["on_policy"] > 0 for r in rows["fsdp"])
    for a, b in zip(rows["deepspeed"], rows["fsdp"]):
        for key in ("loss", "kd", "ce", "hidden", "on_policy"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
