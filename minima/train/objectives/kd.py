"""Knowledge-distillation losses: dense (online teacher) and sparse (cached teacher targets).

Every loss here is a per-position KD term between the teacher distribution ``p = softmax(t / T)`` and
the student distribution ``q = softmax(s / T)``:

- ``forward_kl``: KL(p || q) = sum p (log p - log q). Mode covering; Minitron's choice.
- ``reverse_kl``: KL(q || p). Mode seeking.
- ``jsd``: the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024) with weight beta:
  beta KL(p || m) + (1 - beta) KL(q || m) with m = beta p + (1 - beta) q; beta = 0.5 is the plain JSD
  (bounded by log 2). As in TRL's GKDTrainer, beta = 0 is forward KL and beta = 1 reverse KL.
- ``soft_ce``: -sum p log q = forward KL + H(p). MiniMA's term; same student gradient as forward_kl,
  but its value never reaches 0 (it bottoms out at the teacher's entropy).

**Temperature.** Both distributions are softened by the same T and the KD term is multiplied by T^2
(Hinton et al. 2015). Why: d KL(p_T || q_T) / d s = (q_T - p_T) / T, whose size falls like 1/T^2 for
large T; the T^2 factor keeps the gradient scale (and so the useful alpha / lr) about the same when T
changes. For large T, T^2 * KL tends to sum_j (d_j - mean d)^2 / (2V) with d = t - s, i.e. logit
matching (tests check this limit).

**Memory.** The dense loss is one autograd Function that reads the student and teacher logits in
vocab chunks (``chunk`` columns at a time, fp32 per chunk whatever the logits dtype) and keeps only
per-row statistics; backward writes the student gradient chunk by chunk into one buffer. Neither a
second [rows, vocab] softmax/log-softmax copy nor a separate CE gradient is ever materialised, so peak
memory is student logits + teacher logits + one gradient, whatever the chunk (chunking bounds the
fp32 temporaries to [rows, chunk]). The hard-label CE is fused into the same Function for that reason.

**Cached (sparse) teachers.** Two target kinds can stand in for the teacher's full distribution:

- ``top_k``: the teacher's k largest logits and the probability mass of all other tokens ("rest").
  The loss is computed between the (k + 1)-bucket distributions (the k tokens, plus one bucket for
  everything else) of the teacher and of the student. At k = vocab this is exactly the dense loss.
- ``sampled``: K tokens drawn (with replacement) from a proposal pi ∝ p^beta with importance weights
  w = p(x) / (K pi(x)); for beta = 1 every weight is 1/K. sum_i w_i f(x_i) is an unbiased estimate of
  sum_x p(x) f(x), so forward_kl / soft_ce and their gradients are unbiased (only these two kinds:
  reverse KL and JSD need p under the student's samples, which a cache cannot know).

**The bias of plain top-k.** The common shortcut renormalises the teacher over its top k tokens and
ignores the rest (``renormalize=True`` below reproduces it). Its target puts the tail's mass onto the
head, so (1) the student is taught to be more confident than the teacher (the tail mass it should
keep is trained towards 0: worse calibration and perplexity), and (2) the expected gradient differs
from the true one on every token, by an amount that does not shrink with more data. Keeping the
rest mass as an extra bucket removes the calibration part (the student keeps the teacher's total tail
mass) but cannot say how the tail is split: the bucketed KL is a lower bound of the true KL (data
processing inequality) and equal to it at k = vocab. Sampled targets have no bias, only variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

KD_KINDS = ("forward_kl", "reverse_kl", "jsd", "soft_ce")
IGNORE_INDEX = -100
_LOG2 = math.log(2.0)


def _check_kind(kind: str) -> None:
    if kind not in KD_KINDS:
        raise ValueError(f"unknown KD loss {kind!r}; choose one of {', '.join(KD_KINDS)}")


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Upcast to at least fp32 (bf16/fp16 logits are computed in fp32; fp64 stays fp64 for gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _chunks(vocab: int, chunk: int):
    step = vocab if chunk <= 0 else min(chunk, vocab)
    for a in range(0, vocab, step):
        yield a, min(a + step, vocab)


def _lse_chunked(x: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
    """Row logsumexp of ``x * scale`` in fp32, reading ``chunk`` columns at a time."""
    m = torch.full((x.shape[0],), -math.inf, dtype=_acc(x[:1, :1]).dtype, device=x.device)
    acc = torch.zeros_like(m)
    for a, b in _chunks(x.shape[1], chunk):
        c = _acc(x[:, a:b]) * scale
        cm = torch.maximum(m, c.max(dim=1).values)
        safe = torch.where(torch.isfinite(cm), cm, torch.zeros_like(cm))
        acc = acc * torch.exp(m - safe) + torch.exp(c - safe[:, None]).sum(dim=1)
        m = cm
    safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return torch.log(acc) + safe


# ----------------------------------------------------------------------------------- dense
class _Online:
    """Running logsumexp over column chunks: m (row max so far) and S = sum exp(x - m).

    ``add`` returns the chunk's exp(x - m_new) and the factor exp(m_old - m_new) by which every other
    running sum kept against the same max must be rescaled (the online-softmax trick), so one pass
    over the vocab gives the logsumexp and any p-weighted sums at once.
    """

    def __init__(self, n: int, like: torch.Tensor):
        self.m = torch.full((n,), -math.inf, dtype=like.dtype, device=like.device)
        self.S = torch.zeros((n,), dtype=like.dtype, device=like.device)

    def add(self, c: torch.Tensor):
        m_new = torch.maximum(self.m, c.max(dim=1).values)
        safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        scale = torch.exp(self.m - safe)
        e = torch.exp(c - safe[:, None])
        self.S = self.S * scale + e.sum(dim=1)
        self.m = m_new
        return e, scale

    def lse(self) -> torch.Tensor:
        safe = torch.where(torch.isfinite(self.m), self.m, torch.zeros_like(self.m))
        return torch.log(self.S) + safe


class _DenseLoss(torch.autograd.Function):
    """(student, teacher|None, labels) -> (ce [N], kd [N]); chunked over the vocab, see module doc.

    forward_kl, soft_ce and reverse_kl take one pass over the vocab (running logsumexps plus
    p-weighted sums, rescaled as the running max moves); jsd needs the two logsumexps first, so two.
    Backward takes one exp per logit tensor per element (two with T != 1, for the CE's softmax).
    """

    @staticmethod
    def forward(ctx, s, t, labels, kind, T, chunk, beta=0.5):
        n, v = s.shape
        log_b, log_1mb = math.log(beta) if beta > 0 else -math.inf, math.log1p(-beta) if beta < 1 else -math.inf
        ce_lab = _acc(s.gather(1, labels[:, None]).squeeze(1))
        like = ce_lab
        aux = torch.zeros_like(like)
        kd = torch.zeros_like(like)
        su = _Online(n, like)  # student at T (at T = 1 also the CE's logsumexp)
        s1 = _Online(n, like) if (t is not None and T != 1.0) else None
        if t is None:
            for a, b in _chunks(v, chunk):
                su.add(_acc(s[:, a:b]))
            lse1 = lse_s = lse_t = su.lse()
        elif kind == "jsd":
            tv = _Online(n, like)
            for a, b in _chunks(v, chunk):
                sc = _acc(s[:, a:b])
                su.add(sc / T)
                tv.add(_acc(t[:, a:b]) / T)
                if s1 is not None:
                    s1.add(sc)
            lse_s, lse_t = su.lse(), tv.lse()
            for a, b in _chunks(v, chunk):
                logq = _acc(s[:, a:b]) / T - lse_s[:, None]
                logp = _acc(t[:, a:b]) / T - lse_t[:, None]
                logm = torch.logaddexp(logp + log_b, logq + log_1mb)
                kd += beta * (logp.exp() * (logp - logm)).sum(1)
                aux += (logq.exp() * (logq - logm)).sum(1)  # KL(q || m), needed by backward
            kd = (kd + (1.0 - beta) * aux) * (T * T)
            lse1 = lse_s if s1 is None else s1.lse()
        else:
            tv = _Online(n, like)
            acc = torch.zeros_like(like)  # sum w (x - y) against the weighting tensor's running max
            for a, b in _chunks(v, chunk):
                sc = _acc(s[:, a:b])
                u, w = sc / T, _acc(t[:, a:b]) / T
                eu, scale_u = su.add(u)
                ev, scale_v = tv.add(w)
                if kind == "reverse_kl":  # sum q (u - v)
                    acc = acc * scale_u + (eu * (u - w)).sum(1)
                elif kind == "forward_kl":  # sum p (v - u)
                    acc = acc * scale_v + (ev * (w - u)).sum(1)
                else:  # soft_ce: sum p u
                    acc = acc * scale_v + (ev * u).sum(1)
                if s1 is not None:
                    s1.add(sc)
            lse_s, lse_t = su.lse(), tv.lse()
            if kind == "reverse_kl":
                kd = acc / su.S + lse_t - lse_s
            elif kind == "forward_kl":
                kd = acc / tv.S - lse_t + lse_s
            else:
                kd = lse_s - acc / tv.S
            kd = kd * (T * T)
            lse1 = lse_s if s1 is None else s1.lse()
        ce = lse1 - ce_lab
        ctx.save_for_backward(s, t, labels, lse1, lse_s, lse_t, kd, aux)
        ctx.kind, ctx.T, ctx.chunk, ctx.beta = kind, T, chunk, beta
        return ce, kd

    @staticmethod
    def backward(ctx, g_ce, g_kd):
        s, t, labels, lse1, lse_s, lse_t, kd, aux = ctx.saved_tensors
        kind, T, chunk, beta = ctx.kind, ctx.T, ctx.chunk, ctx.beta
        log_b, log_1mb = math.log(beta) if beta > 0 else -math.inf, math.log1p(-beta) if beta < 1 else -math.inf
        grad = torch.empty_like(s)
        g_ce = g_ce.to(lse1.dtype) if g_ce is not None else torch.zeros_like(lse1)
        use_kd = t is not None and g_kd is not None
        if use_kd:
            g_kd = g_kd.to(lse1.dtype)
            kd_raw = kd / (T * T)
        for a, b in _chunks(s.shape[1], chunk):
            sc = _acc(s[:, a:b])
            if not use_kd:
                grad[:, a:b] = (g_ce[:, None] * torch.exp(sc - lse1[:, None])).to(grad.dtype)
                continue
            logq = sc / T - lse_s[:, None]
            logp = _acc(t[:, a:b]) / T - lse_t[:, None]
            q = logq.exp()
            if kind in ("forward_kl", "soft_ce"):
                du = q - logp.exp()
            elif kind == "reverse_kl":
                du = q * (logq - logp - kd_raw[:, None])
            else:  # d/dq of the generalized JSD is (1 - beta) (log q - log m)
                logm = torch.logaddexp(logp + log_b, logq + log_1mb)
                du = (1.0 - beta) * q * (logq - logm - aux[:, None])
            # softmax of the CE term: q itself at T = 1
            p1 = q if T == 1.0 else torch.exp(sc - lse1[:, None])
            # d(T^2 * L)/ds = T^2 * (dL/du) / T
            grad[:, a:b] = (g_ce[:, None] * p1 + (g_kd * T)[:, None] * du).to(grad.dtype)
        # CE's one-hot part, added once outside the chunk loop (scatter_add keeps duplicates right)
        grad.scatter_add_(1, labels[:, None], (-g_ce[:, None]).to(grad.dtype))
        return grad, None, None, None, None, None, None


def _jsd_kind(kind: str, beta: float) -> str:
    """GKD's end points: jsd at beta 0 is forward KL, at beta 1 reverse KL (TRL's convention)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd_beta must lie in [0, 1], got {beta}")
    if kind == "jsd" and beta == 0.0:
        return "forward_kl"
    if kind == "jsd" and beta == 1.0:
        return "reverse_kl"
    return kind


def dense_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    chunk: int = 0,
    beta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row hard CE and KD term against a dense teacher, fused and chunked over the vocab.

    Args:
        student_logits: [N, V] (any float dtype; math is fp32 per chunk).
        labels: [N] target ids; rows with ``-100`` get ce = 0 and kd = 0.
        teacher_logits: [N, V] or None (then kd is all zeros); no gradient flows into it.
        kind: one of ``KD_KINDS``.
        temperature: T; the KD term is T^2 * D(p_T, q_T).
        chunk: vocab columns per chunk (0 = the whole vocab at once).
        beta: the generalized JSD's weight (``jsd`` only).

    Returns:
        (ce, kd), each [N] fp32. Sum them with your weights; rows are already masked.
    """
    _check_kind(kind)
    kind = _jsd_kind(kind, float(beta))
    if teacher_logits is not None:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} != student {tuple(student_logits.shape)}")
        teacher_logits = teacher_logits.detach()
    ce, kd = _DenseLoss.apply(
        student_logits, teacher_logits, labels.clamp(min=0), kind, float(temperature), int(chunk), float(beta)
    )
    mask = (labels != IGNORE_INDEX).to(ce.dtype)
    return ce * mask, kd * mask


def kd_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """The textbook per-row KD term with plain autograd over the whole vocab (tests, small inputs)."""
    _check_kind(kind)
    kind = _jsd_kind(kind, float(beta))
    T = float(temperature)
    logq = torch.log_softmax(student_logits.double() / T, dim=-1)
    logp = torch.log_softmax(teacher_logits.double() / T, dim=-1)
    p, q = logp.exp(), logq.exp()
    if kind == "forward_kl":
        out = (p * (logp - logq)).sum(-1)
    elif kind == "soft_ce":
        out = -(p * logq).sum(-1)
    elif kind == "reverse_kl":
        out = (q * (logq - logp)).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        out = beta * (p * (logp - m.log())).sum(-1) + (1 - beta) * (q * (logq - m.log())).sum(-1)
    return out * (T * T)


# ----------------------------------------------------------------------------------- sparse
@dataclass
class SparseTargets:
    """Cached teacher targets for N positions.

    Attributes:
        mode: ``top_k`` or ``sampled``.
        ids: [N, k] token ids (long).
        values: top_k: the teacher's logits at ``ids`` (any common shift per row is fine);
            sampled: the teacher's log-probability at ``ids`` at the cache temperature.
        rest: top_k: teacher probability mass outside ``ids`` at the cache temperature, [N];
            sampled: unused (zeros).
        weights: sampled: importance weights [N, k] (sum_i w_i f(x_i) estimates E_p f); top_k: None.
        temperature: the T the targets were made at (rest mass and samples depend on it).
    """

    mode: str
    ids: torch.Tensor
    values: torch.Tensor
    rest: torch.Tensor
    weights: Optional[torch.Tensor] = None
    temperature: float = 1.0

    @property
    def k(self) -> int:
        return self.ids.shape[1]


def top_k_targets(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, chunk: int = 0) -> SparseTargets:
    """Top-k logits (shifted so the largest is 0, which keeps fp16 storage precise) + the rest's mass."""
    with torch.no_grad():
        k = min(k, teacher_logits.shape[1])
        vals, ids = _acc(teacher_logits).topk(k, dim=1)
        vals = vals - vals[:, :1]
        lse_all = (
            _lse_chunked(teacher_logits, 1.0 / temperature, chunk) - _acc(teacher_logits).max(1).values / temperature
        )
        lse_top = torch.logsumexp(vals / temperature, dim=1)
        # rest = 1 - exp(lse_top - lse_all), computed as -expm1 for precision when the rest is tiny
        rest = (-torch.expm1((lse_top - lse_all).clamp(max=0.0))).clamp(min=0.0)
        if k == teacher_logits.shape[1]:
            rest = torch.zeros_like(rest)
    return SparseTargets("top_k", ids, vals, rest, None, float(temperature))


def sampled_targets(
    teacher_logits: torch.Tensor,
    num_samples: int,
    temperature: float = 1.0,
    proposal_power: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> SparseTargets:
    """K draws per row from pi ∝ p^beta with importance weights p / (K pi) (beta = 1: plain sampling)."""
    with torch.no_grad():
        logp = torch.log_softmax(_acc(teacher_logits) / temperature, dim=1)
        logpi = torch.log_softmax(logp * proposal_power, dim=1)
        ids = torch.multinomial(logpi.exp(), num_samples, replacement=True, generator=generator)
        lp = logp.gather(1, ids)
        w = torch.exp(lp - logpi.gather(1, ids)) / num_samples
    return SparseTargets("sampled", ids, lp, torch.zeros(ids.shape[0], device=ids.device), w, float(temperature))


class _LogitStats(torch.autograd.Function):
    """s [N, V] -> (lse(s), s[label], lse(s/T), lse over non-``ids`` of s/T, s[ids]), in one pass.

    Backward takes one exp per element at T = 1: the CE softmax, the KD softmax and the rest-bucket
    softmax are the same exp(s/T - lse(s/T)) times per-row factors (the last one masked).
    """

    @staticmethod
    def forward(ctx, s, labels, ids, T, chunk):
        n, v = s.shape
        sf_lab = _acc(s.gather(1, labels[:, None]).squeeze(1))
        s_ids = _acc(s.gather(1, ids))
        st = _Online(n, sf_lab)
        s1 = _Online(n, sf_lab) if T != 1.0 else None
        rest = torch.zeros_like(sf_lab)  # sum over non-ids of exp(s/T - running max)
        for a, b in _chunks(v, chunk):
            sc = _acc(s[:, a:b])
            e, scale = st.add(sc / T)
            rest = rest * scale + e.masked_fill_(_ids_mask(ids, a, b), 0.0).sum(1)  # e is a temporary
            if s1 is not None:
                s1.add(sc)
        lseT = st.lse()
        lse1 = lseT if s1 is None else s1.lse()
        safe_m = torch.where(torch.isfinite(st.m), st.m, torch.zeros_like(st.m))
        lse_rest = torch.log(rest) + safe_m  # -inf when ids cover every token (k = vocab)
        ctx.save_for_backward(s, labels, ids, lse1, lseT, lse_rest)
        ctx.T, ctx.chunk = T, chunk
        return lse1, sf_lab, lseT, lse_rest, s_ids

    @staticmethod
    def backward(ctx, g_lse1, g_lab, g_lseT, g_rest, g_ids):
        s, labels, ids, lse1, lseT, lse_rest = ctx.saved_tensors
        T, chunk = ctx.T, ctx.chunk
        z = torch.zeros_like(lse1)
        g_lse1 = z if g_lse1 is None else g_lse1.to(z.dtype)
        g_lseT = z if g_lseT is None else g_lseT.to(z.dtype)
        g_rest = z if g_rest is None else torch.nan_to_num(g_rest.to(z.dtype), nan=0.0, posinf=0.0, neginf=0.0)
        rest_finite = torch.isfinite(lse_rest)
        g_rest = torch.where(rest_finite, g_rest, torch.zeros_like(g_rest))
        # softmax over the rest = softmax(s/T) * exp(lseT - lse_rest) on the non-ids columns
        rest_factor = torch.where(rest_finite, torch.exp(lseT - torch.where(rest_finite, lse_rest, lseT)), z)
        coef_T = (g_lseT + g_lse1 * (T == 1.0)) / T
        grad = torch.empty_like(s)
        for a, b in _chunks(s.shape[1], chunk):
            sc = _acc(s[:, a:b])
            pT = torch.exp(sc / T - lseT[:, None])
            gc = coef_T[:, None] * pT
            gc.addcmul_((g_rest / T * rest_factor)[:, None], pT.masked_fill_(_ids_mask(ids, a, b), 0.0))
            if T != 1.0:
                gc = gc + g_lse1[:, None] * torch.exp(sc - lse1[:, None])
            grad[:, a:b] = gc.to(grad.dtype)
        if g_lab is not None:
            grad.scatter_add_(1, labels[:, None], g_lab[:, None].to(grad.dtype))
        if g_ids is not None:
            grad.scatter_add_(1, ids, g_ids.to(grad.dtype))
        return grad, None, None, None, None


def _ids_mask(ids: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """[N, b - a] bool: True where column a + j is one of the row's ids (one scatter, no nonzero())."""
    w = b - a
    local = ids - a
    local = torch.where((local >= 0) & (local < w), local, torch.full_like(local, w))  # others -> a spare column
    mask = torch.zeros(ids.shape[0], w + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(1, local, True)
    return mask[:, :w]


def _bucket_kd(logp: torch.Tensor, logq: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """KD between two small discrete distributions given as log-probs [N, B] (-inf allowed)."""
    p, q = logp.exp(), logq.exp()
    # clamp -inf to a finite floor: the value is multiplied by p = 0 (or q = 0) and clamp's gradient
    # there is 0, so 0 * log 0 = 0 with no NaN in backward
    tiny = math.log(torch.finfo(torch.float32).tiny)
    lp, lq = logp.clamp(min=tiny), logq.clamp(min=tiny)
    if kind == "forward_kl":
        return (p * (lp - lq)).sum(1)
    if kind == "soft_ce":
        return -(p * lq).sum(1)
    if kind == "reverse_kl":
        return (q * (lq - lp)).sum(1)
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    return beta * (p * (lp - lm)).sum(1) + (1 - beta) * (q * (lq - lm)).sum(1)


def sparse_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    targets: SparseTargets,
    kind: str = "forward_kl",
    temperature: Optional[float] = None,
    chunk: int = 0,
    renormalize: bool = False,
    beta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row hard CE and KD term against cached sparse targets (see the module doc for the maths).

    Args:
        student_logits: [N, V].
        labels: [N]; ``-100`` rows are masked.
        targets: the cached targets for these N rows.
        kind: KD term; ``sampled`` targets support ``forward_kl`` and ``soft_ce`` only.
        temperature: must equal ``targets.temperature`` (the rest mass / samples depend on it).
        chunk: vocab columns per chunk for the student's statistics.
        renormalize: plain top-k (teacher renormalised over its k tokens, no rest bucket). Biased;
            kept to measure that bias, not for training.
        beta: the generalized JSD's weight (``jsd`` only).

    Returns:
        (ce, kd), each [N] fp32, masked.
    """
    _check_kind(kind)
    kind = _jsd_kind(kind, float(beta))
    T = targets.temperature if temperature is None else float(temperature)
    if abs(T - targets.temperature) > 1e-6:
        raise ValueError(f"targets were cached at temperature {targets.temperature}, loss asks for {T}")
    if targets.mode == "sampled" and kind not in ("forward_kl", "soft_ce"):
        raise ValueError(f"sampled targets support forward_kl and soft_ce, not {kind}")
    safe_labels = labels.clamp(min=0)
    ids = targets.ids.long()
    lse1, s_lab, lseT, lse_rest, s_ids = _LogitStats.apply(student_logits, safe_labels, ids, T, int(chunk))
    ce = lse1 - s_lab
    logq = s_ids / T - lseT[:, None]
    if targets.mode == "sampled":
        w = targets.weights.to(logq.dtype)
        lp = targets.values.to(logq.dtype)
        kd = -(w * logq).sum(1) if kind == "soft_ce" else (w * (lp - logq)).sum(1)
    else:
        v = targets.values.to(logq.dtype) / T
        if renormalize:
            logp = torch.log_softmax(v, dim=1)
            logq_b = torch.log_softmax(logq, dim=1) if kind in ("reverse_kl", "jsd") else logq
            kd = _bucket_kd(logp, logq_b, kind, float(beta))
        else:
            rest = targets.rest.to(logq.dtype).clamp(0.0, 1.0)
            logp_top = v - torch.logsumexp(v, dim=1, keepdim=True) + torch.log1p(-rest.clamp(max=1 - 1e-7))[:, None]
            logp = torch.cat([logp_top, torch.log(rest)[:, None]], dim=1)
            logq_rest = lse_rest - lseT  # lse_rest is already over s / T
            logq_b = torch.cat([logq, logq_rest[:, None]], dim=1)
            kd = _bucket_kd(logp, logq_b, kind, float(beta))
    kd = kd * (T * T)
    mask = (labels != IGNORE_INDEX).to(ce.dtype)
    return ce * mask, kd * mask


# ----------------------------------------------------------------------------------- hidden states
HIDDEN_KINDS = ("mse", "cosine")


def uniform_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student block i (1-based) -> teacher block round(i * L_t / L_s): the last layers always meet."""
    return {i: max(1, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)}


class HiddenProjection(torch.nn.Module):
    """One learned linear map (student width -> teacher width) per mapped student layer.

    Trained with the student (it is a submodule of the student while training, so the strategy shards,
    optimises and checkpoints it) and removed before export. Initialised to the identity on the shared
    leading channels, which is exact for a width-pruned student that kept its first channels.
    """

    def __init__(self, layers: list[int], student_width: int, teacher_width: int):
        super().__init__()
        self.maps = torch.nn.ModuleDict(
            {str(i): torch.nn.Linear(student_width, teacher_width, bias=False) for i in layers}
        )
        for m in self.maps.values():
            if not m.weight.is_meta:  # meta copies (other ranks of a sharded run) get rank 0's weights
                torch.nn.init.eye_(m.weight)

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        lin = self.maps[str(layer)]
        return lin(h.to(lin.weight.dtype))


def hidden_distance(
    student_hidden,
    teacher_hidden,
    layer_map: dict[int, int],
    kind: str = "mse",
    projection: Optional[HiddenProjection] = None,
) -> torch.Tensor:
    """Per-position distance between student and teacher hidden states, averaged over the mapped layers.

    Args:
        student_hidden: HF ``hidden_states`` of the student (entry 0 = embeddings, entry i = block i's output).
        teacher_hidden: the teacher's, same batch and positions; no gradient flows into it.
        layer_map: student block -> teacher block (1-based).
        kind: ``mse`` (mean squared difference over the width) or ``cosine`` (1 - cosine similarity).
        projection: maps student width to teacher width (None: the widths must be equal).

    Returns:
        [batch * seq] fp32.
    """
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"unknown hidden-state distance {kind!r}; choose one of {', '.join(HIDDEN_KINDS)}")
    total = None
    for i, j in sorted(layer_map.items()):
        hs = student_hidden[i]
        if projection is not None:
            hs = projection(i, hs)
        hs = hs.float().reshape(-1, hs.shape[-1])
        ht = teacher_hidden[j].detach().float().reshape(-1, teacher_hidden[j].shape[-1])
        if kind == "mse":
            d = (hs - ht).pow(2).mean(-1)
        else:
            d = 1.0 - torch.nn.functional.cosine_similarity(hs, ht, dim=-1, eps=1e-8)
        total = d if total is None else total + d
    return total / len(layer_map)
