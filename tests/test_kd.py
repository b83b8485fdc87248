"""KD losses against hand computations, autograd references and gradcheck (minima/kd.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from minima.train.objectives.kd import (
    KD_KINDS,
    SparseTargets,
    dense_loss,
    kd_reference,
    sampled_targets,
    sparse_loss,
    top_k_targets,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: threads only add contention on the shared 2-core CI machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _logits(n=6, v=37, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * scale).to(dtype)


def _kd(s, t, kind, T=1.0, chunk=0):
    labels = torch.zeros(s.shape[0], dtype=torch.long)
    return dense_loss(s, labels, t, kind, T, chunk)[1]


def test_hand_computation_three_tokens():
    # teacher p = (1/2, 1/4, 1/4), student q uniform: every term by hand with math.log
    t = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.25)]], dtype=torch.float64)
    s = torch.zeros(1, 3, dtype=torch.float64)
    p, q = [0.5, 0.25, 0.25], [1 / 3] * 3
    m = [(a + b) / 2 for a, b in zip(p, q)]
    want = {
        "forward_kl": sum(a * math.log(a / b) for a, b in zip(p, q)),
        "reverse_kl": sum(b * math.log(b / a) for a, b in zip(p, q)),
        "soft_ce": -sum(a * math.log(b) for a, b in zip(p, q)),
        "jsd": 0.5 * sum(a * math.log(a / c) for a, c in zip(p, m))
        + 0.5 * sum(b * math.log(b / c) for b, c in zip(q, m)),
    }
    for kind, value in want.items():
        assert _kd(s, t, kind).item() == pytest.approx(value, rel=1e-12), kind
    # forward KL = 0.5 ln 1.5 + 0.5 ln 0.75 = 0.0589 nats, written out once more
    assert want["forward_kl"] == pytest.approx(0.5 * math.log(1.5) + 0.5 * math.log(0.75))
    # hard CE on label 1 of the uniform student: ln 3
    ce, _ = dense_loss(s, torch.tensor([1]), t)
    assert ce.item() == pytest.approx(math.log(3))


@pytest.mark.parametrize("kind", KD_KINDS)
def test_nonnegative_and_zero_at_equality(kind):
    s, t = _logits(seed=1), _logits(seed=2)
    for T in (0.5, 1.0, 3.0):
        d = _kd(s, t, kind, T, chunk=8)
        same = _kd(t.clone(), t, kind, T, chunk=8)
        if kind == "soft_ce":  # soft CE bottoms out at the teacher's entropy, KL at 0
            p = torch.softmax(t / T, -1)
            entropy = -(p * p.log()).sum(-1) * T * T
            assert torch.allclose(same, entropy, atol=1e-10)
            assert (d >= entropy - 1e-10).all()
        else:
            assert (d > 0).all()
            assert same.abs().max() < 1e-10
    if kind == "jsd":
        assert (_kd(s * 50, t * 50, kind) <= math.log(2) + 1e-9).all()  # JSD is bounded by ln 2


@pytest.mark.parametrize("kind", KD_KINDS)
@pytest.mark.parametrize("T,chunk", [(1.0, 0), (2.5, 8), (0.7, 5)])
def test_gradcheck_dense(kind, T, chunk):
    s, t = _logits(4, 13, seed=3), _logits(4, 13, seed=4)
    labels = torch.tensor([0, 5, -100, 12])
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: dense_loss(x, labels, t, kind, T, chunk), (s,), fast_mode=chunk != 0)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_chunked_equals_unchunked_and_reference(kind):
    s, t = _logits(8, 101, seed=5, dtype=torch.float32), _logits(8, 101, seed=6, dtype=torch.float32)
    labels = torch.randint(0, 101, (8,), generator=torch.Generator().manual_seed(0))
    labels[3] = -100
    outs = []
    for chunk in (0, 1, 7, 64, 101, 500):
        x = s.clone().requires_grad_(True)
        ce, kd = dense_loss(x, labels, t, kind, 2.0, chunk)
        (0.3 * ce.sum() + 0.7 * kd.sum()).backward()
        outs.append((ce.detach(), kd.detach(), x.grad))
    for ce, kd, g in outs[1:]:
        assert torch.allclose(ce, outs[0][0], atol=1e-5) and torch.allclose(kd, outs[0][1], atol=1e-5)
        assert torch.allclose(g, outs[0][2], atol=1e-6)
    # and both agree with the textbook formula + F.cross_entropy through plain autograd
    x = s.double().clone().requires_grad_(True)
    ref_kd = kd_reference(x, t.double(), kind, 2.0) * (labels != -100)
    ref_ce = F.cross_entropy(x, labels, reduction="none")
    (0.3 * ref_ce.sum() + 0.7 * ref_kd.sum()).backward()
    assert torch.allclose(outs[0][1].double(), ref_kd.detach(), atol=1e-5)
    assert torch.allclose(outs[0][0].double(), ref_ce.detach(), atol=1e-5)
    assert torch.allclose(outs[0][2].double(), x.grad, atol=1e-6)


def test_temperature_scaling():
    s, t = _logits(5, 50, seed=7), _logits(5, 50, seed=8)
    for T in (1.0, 2.0, 4.0):
        # the documented definition: T^2 * KL(softmax(t/T) || softmax(s/T))
        p, logq = torch.softmax(t / T, -1), torch.log_softmax(s / T, -1)
        by_hand = T * T * (p * (p.log() - logq)).sum(-1)
        assert torch.allclose(_kd(s, t, "forward_kl", T), by_hand, atol=1e-12)
    # large T: T^2 KL -> sum((d - mean d)^2) / (2V) with d = t - s (logit matching, Hinton 2015)
    d = t - s
    matching = ((d - d.mean(-1, keepdim=True)) ** 2).sum(-1) / (2 * s.shape[1])
    assert torch.allclose(_kd(s, t, "forward_kl", 1000.0), matching, rtol=1e-2)
    assert not torch.allclose(_kd(s, t, "forward_kl", 1.0), matching, rtol=1e-1)
    # T^2 keeps the gradient scale: without it the norm would shrink ~T^2 = 100x from T=1 to T=10
    norms = []
    for T in (1.0, 10.0):
        x = s.clone().requires_grad_(True)
        _kd(x, t, "forward_kl", T).sum().backward()
        norms.append(x.grad.norm().item())
    assert 0.1 < norms[1] / norms[0] < 3


def test_fused_ce_matches_cross_entropy_and_bf16_is_close():
    s, t = _logits(16, 300, seed=9, dtype=torch.float32), _logits(16, 300, seed=10, dtype=torch.float32)
    labels = torch.randint(0, 300, (16,), generator=torch.Generator().manual_seed(1))
    labels[:3] = -100
    x = s.clone().requires_grad_(True)
    ce, _ = dense_loss(x, labels, None, chunk=64)
    ce.sum().backward()
    y = s.clone().requires_grad_(True)
    F.cross_entropy(y, labels, reduction="sum").backward()
    assert ce.sum().item() == pytest.approx(F.cross_entropy(s, labels, reduction="sum").item(), rel=1e-6)
    assert torch.allclose(x.grad, y.grad, atol=1e-6)
    # bf16 logits: math in fp32 per chunk, result within bf16 rounding of the fp32 answer
    xb = s.bfloat16().requires_grad_(True)
    ce_b, kd_b = dense_loss(xb, labels, t.bfloat16(), "forward_kl", 1.0, 64)
    kd_b.sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and ce_b.dtype == torch.float32
    _, kd_f = dense_loss(s, labels, t, "forward_kl", 1.0, 64)
    assert torch.allclose(kd_b, kd_f, rtol=0.05, atol=0.02)


def test_no_full_size_copies_are_saved_for_backward():
    """Autograd keeps only the student and teacher logits themselves: no [N, V] softmax copies."""
    n, v = 8, 512
    s, t = _logits(n, v, seed=11, dtype=torch.float32).requires_grad_(True), _logits(n, v, seed=12, dtype=torch.float32)
    labels = torch.zeros(n, dtype=torch.long)

    def count_big(fn):
        big = []

        def pack(x):
            if x.numel() >= n * v:
                big.append(x.untyped_storage().data_ptr())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn()
        return big

    fused = count_big(lambda: dense_loss(s, labels, t, "jsd", 2.0, 64))
    assert set(fused) <= {s.untyped_storage().data_ptr(), t.untyped_storage().data_ptr()}
    naive = count_big(lambda: kd_reference(s, t, "jsd", 2.0) + F.cross_entropy(s, labels, reduction="none"))
    assert len(naive) > 3  # the textbook version holds several softmax-sized tensors


@pytest.mark.parametrize("kind", KD_KINDS)
def test_top_k_at_full_vocab_equals_online(kind):
    s, t = _logits(6, 41, seed=13, dtype=torch.float32), _logits(6, 41, seed=14, dtype=torch.float32)
    labels = torch.tensor([1, 2, 3, -100, 5, 40])
    for T in (1.0, 2.0):
        x1 = s.clone().requires_grad_(True)
        ce1, kd1 = dense_loss(x1, labels, t, kind, T, 16)
        (ce1.sum() + kd1.sum()).backward()
        tg = top_k_targets(t, 41, T)
        x2 = s.clone().requires_grad_(True)
        ce2, kd2 = sparse_loss(x2, labels, tg, kind, T, 16)
        (ce2.sum() + kd2.sum()).backward()
        assert torch.allclose(kd1, kd2, atol=1e-5) and torch.allclose(ce1, ce2, atol=1e-6)
        assert torch.allclose(x1.grad, x2.grad, atol=1e-5)
        # fp16 storage (as in the cache): stated tolerance 1e-3 relative on the loss
        tg16 = SparseTargets(tg.mode, tg.ids.int(), tg.values.half(), tg.rest, None, T)
        _, kd3 = sparse_loss(s, labels, tg16, kind, T, 16)
        assert torch.allclose(kd3, kd1, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_gradcheck_sparse(kind):
    s, t = _logits(4, 13, seed=15), _logits(4, 13, seed=16)
    labels = torch.tensor([0, 5, -100, 12])
    top = top_k_targets(t, 4, 1.5)
    assert torch.autograd.gradcheck(
        lambda x: sparse_loss(x, labels, top, kind, 1.5, 5), (s.clone().requires_grad_(True),)
    )
    if kind in ("forward_kl", "soft_ce"):
        smp = sampled_targets(t, 6, 1.5, 0.5, torch.Generator().manual_seed(0))
        assert torch.autograd.gradcheck(
            lambda x: sparse_loss(x, labels, smp, kind, 1.5, 5), (s.clone().requires_grad_(True),), fast_mode=True
        )


def test_top_k_bucket_kl_is_a_lower_bound_increasing_in_k():
    s, t = _logits(6, 60, seed=17), _logits(6, 60, seed=18)
    labels = torch.zeros(6, dtype=torch.long)
    full = kd_reference(s, t, "forward_kl")
    prev = torch.zeros(6, dtype=torch.float64)
    for k in (1, 4, 16, 40, 60):
        _, kd = sparse_loss(s, labels, top_k_targets(t, k), "forward_kl")
        assert (kd <= full + 1e-10).all() and (kd >= prev - 1e-10).all()
        prev = kd
    assert torch.allclose(prev, full, atol=1e-10)


def _grad(fn, s):
    x = s.clone().requires_grad_(True)
    fn(x).sum().backward()
    return x.grad


def test_plain_top_k_is_biased_sampled_is_not():
    """The documented bias: plain (renormalised) top-k misses the true gradient, the rest bucket less,
    and importance-weighted samples average to it."""
    s, t = _logits(4, 200, seed=19, scale=1.0), _logits(4, 200, seed=20, scale=1.5)
    labels = torch.zeros(4, dtype=torch.long)
    exact = _grad(lambda x: kd_reference(x, t, "forward_kl"), s)
    top = top_k_targets(t, 20)
    plain = _grad(lambda x: sparse_loss(x, labels, top, "forward_kl", renormalize=True)[1], s)
    bucket = _grad(lambda x: sparse_loss(x, labels, top, "forward_kl")[1], s)
    err = lambda g: (g - exact).norm().item()
    assert err(bucket) < err(plain)
    # plain top-k tail gradient is q_j > 0 on every tail token: pushes all of them down
    rest_mask = torch.ones_like(s, dtype=torch.bool).scatter_(1, top.ids, False)
    assert (plain[rest_mask] > 0).all()
    # sampled: unbiased, so many draws (beta = 1 and an importance-weighted beta = 0.5) approach it
    for beta in (1.0, 0.5):
        smp = sampled_targets(t, 20000, proposal_power=beta, generator=torch.Generator().manual_seed(0))
        g = _grad(lambda x, smp=smp: sparse_loss(x, labels, smp, "forward_kl")[1], s)
        assert err(g) < 0.25 * err(plain), beta
        _, kd = sparse_loss(s, labels, smp, "forward_kl")
        assert torch.allclose(kd, kd_reference(s, t, "forward_kl"), rtol=0.05, atol=0.02)


def test_sparse_errors_and_masking():
    s, t = _logits(3, 10, seed=21), _logits(3, 10, seed=22)
    labels = torch.tensor([1, -100, 2])
    smp = sampled_targets(t, 4)
    with pytest.raises(ValueError, match="forward_kl and soft_ce"):
        sparse_loss(s, labels, smp, "reverse_kl")
    with pytest.raises(ValueError, match="temperature"):
        sparse_loss(s, labels, top_k_targets(t, 3, 1.0), "forward_kl", temperature=2.0)
    ce, kd = sparse_loss(s, labels, top_k_targets(t, 3), "jsd")
    assert ce[1] == 0 and kd[1] == 0 and ce[0] > 0 and kd[0] > 0
    with pytest.raises(ValueError, match="unknown KD loss"):
        dense_loss(s, labels, t, "kl")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_lm_loss_equals_dense_cross_entropy(dtype):
    """The LM loss (vocab-chunked, labels shifted instead of logits) equals F.cross_entropy over the shifted
    fp32 logits, value and gradient; its token count stays a tensor (no host sync per micro step)."""
    from minima.train.recipe import causal_lm_loss_sum

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 50, generator=g).to(dtype).requires_grad_(True)
    labels = torch.randint(0, 50, (3, 9), generator=g)
    labels[0, :4] = -100
    labels[2, -2:] = -100
    loss, n = causal_lm_loss_sum(logits, labels, chunk=16)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_logits = logits.detach().float().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(
        ref_logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert isinstance(n, torch.Tensor) and int(n) == int((labels[:, 1:] != -100).sum())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(loss.float(), ref, **tol)
    assert grad.dtype == dtype  # one gradient buffer in the logits' dtype, no fp32 copy of the logits
    torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), **tol)


def test_defaults_are_forward_kl_at_temperature_one_on_label_zero():
    """Called with only the required arguments, every entry point is forward KL at T = 1, and label 0 is a
    real label (only -100 is masked)."""
    s, t = _logits(4, 9, seed=30), _logits(4, 9, seed=31)
    labels = torch.tensor([0, 0, 3, -100])
    ref_kd = kd_reference(s, t, "forward_kl", 1.0)
    torch.testing.assert_close(kd_reference(s, t), ref_kd, rtol=0, atol=0)
    ce_ref = F.cross_entropy(s, labels, reduction="none")
    mask = (labels != -100).double()
    ce, kd = dense_loss(s, labels, t)
    torch.testing.assert_close(ce, ce_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(kd, ref_kd * mask, atol=1e-12, rtol=0)
    ce, kd = sparse_loss(s, labels, top_k_targets(t, 9))
    torch.testing.assert_close(ce, ce_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(kd, ref_kd * mask, atol=1e-12, rtol=0)


@pytest.mark.parametrize("T,chunk", [(1.0, 0), (2.0, 0), (0.5, 4), (3.0, 7)])
def test_top_k_rest_mass_by_hand(T, chunk):
    t = _logits(5, 23, seed=32)
    tg = top_k_targets(t, 6, T, chunk)
    p = torch.softmax(t / T, dim=1)
    top = p.topk(6, dim=1)
    assert tg.mode == "top_k" and tg.temperature == T
    assert torch.equal(tg.ids, top.indices)
    torch.testing.assert_close(tg.rest, 1 - top.values.sum(1), atol=1e-12, rtol=0)
    # values are the logits shifted so that the largest is 0
    torch.testing.assert_close(tg.values, t.gather(1, tg.ids) - t.max(1, keepdim=True).values, atol=0, rtol=0)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_jsd_beta_reaches_dense_and_sparse(kind):
    s, t = _logits(4, 11, seed=33), _logits(4, 11, seed=34)
    labels = torch.tensor([1, 2, 3, 4])
    for beta in (0.3, 0.8):
        ref = kd_reference(s, t, kind, 1.5, beta)
        if kind == "jsd":  # the generalized JSD at this beta, written out
            logp, logq = torch.log_softmax(t / 1.5, 1), torch.log_softmax(s / 1.5, 1)
            m = beta * logp.exp() + (1 - beta) * logq.exp()
            hand = beta * (logp.exp() * (logp - m.log())).sum(1) + (1 - beta) * (logq.exp() * (logq - m.log())).sum(1)
            torch.testing.assert_close(ref, hand * 1.5**2, atol=1e-12, rtol=0)
        _, kd = dense_loss(s, labels, t, kind, 1.5, 4, beta)
        torch.testing.assert_close(kd, ref, atol=1e-10, rtol=0)
        _, kd = sparse_loss(s, labels, top_k_targets(t, 11, 1.5), kind, 1.5, 4, beta=beta)
        torch.testing.assert_close(kd, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", KD_KINDS)
def test_plain_top_k_by_hand(kind):
    """renormalize=True: the teacher renormalised over its k tokens; the student's log-probs at those tokens
    as they are for forward KL / soft CE, renormalised over them for reverse KL and JSD."""
    s, t, T, beta = _logits(3, 17, seed=35), _logits(3, 17, seed=36), 2.0, 0.3
    tg = top_k_targets(t, 5, T)
    logp = torch.log_softmax(t.gather(1, tg.ids) / T, 1)
    logq = torch.log_softmax(s / T, 1).gather(1, tg.ids)
    if kind in ("reverse_kl", "jsd"):
        logq = torch.log_softmax(logq, 1)
    p, q = logp.exp(), logq.exp()
    hand = {
        "forward_kl": (p * (logp - logq)).sum(1),
        "soft_ce": -(p * logq).sum(1),
        "reverse_kl": (q * (logq - logp)).sum(1),
        "jsd": beta * (p * (logp - (beta * p + (1 - beta) * q).log())).sum(1)
        + (1 - beta) * (q * (logq - (beta * p + (1 - beta) * q).log())).sum(1),
    }[kind] * T**2
    _, kd = sparse_loss(s, torch.zeros(3, dtype=torch.long), tg, kind, T, renormalize=True, beta=beta)
    torch.testing.assert_close(kd, hand, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["forward_kl", "soft_ce"])
def test_sampled_targets_by_hand(kind):
    """Sampled targets: sum_i w_i f(x_i) with f = log p - log q (forward KL) or -log q (soft CE), times T^2."""
    s, t, T = _logits(4, 19, seed=37), _logits(4, 19, seed=38), 1.5
    smp = sampled_targets(t, 7, T, 0.5, torch.Generator().manual_seed(1))
    logq = torch.log_softmax(s / T, 1).gather(1, smp.ids)
    hand = -(smp.weights * logq).sum(1) if kind == "soft_ce" else (smp.weights * (smp.values - logq)).sum(1)
    _, kd = sparse_loss(s, torch.zeros(4, dtype=torch.long), smp, kind, T)
    torch.testing.assert_close(kd, hand * T**2, atol=1e-12, rtol=0)


def test_rest_mass_outside_zero_one_is_clamped():
    """A stored rest mass a little outside [0, 1] (a lossy cache) counts as 0 or 1 exactly; fp16 storage of it
    is read in the loss's precision."""
    s, t = _logits(2, 12, seed=39), _logits(2, 12, seed=40)
    labels = torch.zeros(2, dtype=torch.long)
    tg = top_k_targets(t, 3)
    for stored, exact in ((-1e-3, 0.0), (1.0 + 1e-3, 1.0)):
        off = SparseTargets("top_k", tg.ids, tg.values, torch.full((2,), stored), None, 1.0)
        at = SparseTargets("top_k", tg.ids, tg.values, torch.full((2,), exact), None, 1.0)
        for kind in KD_KINDS:
            got, want = sparse_loss(s, labels, off, kind)[1], sparse_loss(s, labels, at, kind)[1]
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    half = SparseTargets("top_k", tg.ids, tg.values, tg.rest.half(), None, 1.0)
    full = SparseTargets("top_k", tg.ids, tg.values, tg.rest.half().double(), None, 1.0)
    torch.testing.assert_close(sparse_loss(s, labels, half)[1], sparse_loss(s, labels, full)[1], atol=1e-14, rtol=0)


def test_sparse_backward_on_bf16_logits():
    """bf16 student logits: the gradient comes back in bf16 and equals the fp32 gradient within bf16 rounding."""
    s, t = _logits(4, 30, seed=41, dtype=torch.float32), _logits(4, 30, seed=42, dtype=torch.float32)
    labels = torch.tensor([0, 7, -100, 29])
    grads = []
    for dtype in (torch.bfloat16, torch.float32):
        for tg in (top_k_targets(t, 5, 2.0), sampled_targets(t, 6, 2.0, 1.0, torch.Generator().manual_seed(2))):
            x = s.clone().to(dtype).requires_grad_(True)
            ce, kd = sparse_loss(x, labels, tg, "forward_kl", 2.0, 8)
            (ce.sum() + kd.sum()).backward()
            assert x.grad.dtype == dtype
            grads.append(x.grad.float())
    torch.testing.assert_close(grads[0], grads[2], atol=0.02, rtol=0.05)
    torch.testing.assert_close(grads[1], grads[3], atol=0.02, rtol=0.05)


def test_jsd_end_points_are_forward_and_reverse_kl():
    """TRL's convention: jsd at beta 0 is forward KL, at beta 1 reverse KL; value and gradient, dense and sparse."""
    s, t = _logits(3, 10, seed=43), _logits(3, 10, seed=44)
    labels = torch.tensor([0, 4, 9])
    for beta, same in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        x = s.clone().requires_grad_(True)
        ref = kd_reference(x, t, same, 2.0)
        (g_ref,) = torch.autograd.grad(ref.sum(), x)
        for loss in (
            lambda x, beta=beta: dense_loss(x, labels, t, "jsd", 2.0, 4, beta)[1],
            lambda x, beta=beta: sparse_loss(x, labels, top_k_targets(t, 10, 2.0), "jsd", 2.0, 4, beta=beta)[1],
        ):
            x = s.clone().requires_grad_(True)
            kd = loss(x)
            (g,) = torch.autograd.grad(kd.sum(), x)
            torch.testing.assert_close(kd, ref.detach(), atol=1e-10, rtol=0)
            torch.testing.assert_close(g, g_ref, atol=1e-10, rtol=0)
