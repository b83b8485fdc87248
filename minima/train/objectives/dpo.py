"""Preference losses per pair: DPO (sigmoid, with cDPO label smoothing), IPO, SimPO and ORPO.

Inputs are per-pair scores of the chosen (c) and rejected (r) responses: the summed log-probability
of each response's labelled tokens under the policy (``pc``, ``pr``) and the reference (``rc``,
``rr``), and the numbers of those tokens (``nc``, ``nr``). With ``beta`` = b, ``label_smoothing`` = e:

- ``sigmoid`` (DPO; cDPO when e > 0): d = (pc - rc) - (pr - rr);
  loss = -(1 - e) log s(b d) - e log s(-b d).
- ``ipo``: d = (pc - rc) / nc - (pr - rr) / nr (log-ratios averaged per token, as TRL does);
  loss = (d - 1 / (2 b))^2.
- ``simpo`` (no reference): d = pc / nc - pr / nr - gamma / b; loss = -(1 - e) log s(b d) - e log s(-b d).
- ``orpo`` (no reference): with per-token means ac = pc / nc, ar = pr / nr,
  log_odds = (ac - ar) - (log(1 - exp(ac)) - log(1 - exp(ar)));
  loss = sft_weight * nll - b log s(log_odds), where nll is the per-token NLL of the whole chosen
  sequence, prompt included (as TRL's ORPOTrainer computes it), taken per pair so that the loss stays
  a mean over pairs.

Rewards (TRL's logging): b (pc - rc) and b (pr - rr) with a reference; b ac and b ar without one.
``logps/chosen`` and ``logps/rejected`` are the scores the loss uses (sums, or per-token means for
simpo and orpo). The sigmoid, ipo and simpo losses and every reward equal TRL 1.16's (tested);
orpo's odds-ratio term does, and its SFT term equals TRL's per pair (TRL averages the NLL over a
whole batch's tokens, which is the same number for a batch of one pair).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_TYPES = ("sigmoid", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class PairLosses:
    """Per-pair tensors (shape [B]) of one batch."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # orpo: nll_loss, log_odds_ratio, log_odds_chosen

    def metrics(self) -> dict[str, torch.Tensor]:
        """TRL's metric names -> per-pair values (accuracy counts a tie as one half)."""
        c, r = self.chosen_rewards.detach(), self.rejected_rewards.detach()
        acc = (c > r).float() + 0.5 * (c == r).float()
        out = {
            "rewards/chosen": c,
            "rewards/rejected": r,
            "rewards/accuracies": acc,
            "rewards/margins": c - r,
            "logps/chosen": self.chosen_logps.detach(),
            "logps/rejected": self.rejected_logps.detach(),
        }
        out.update({k: v.detach() for k, v in self.extra.items()})
        return out


def token_logps(
    logits: torch.Tensor, labels: torch.Tensor, input_ids: torch.Tensor | None = None, attention_mask=None
) -> tuple[torch.Tensor, ...]:
    """Summed next-token log-probabilities of each row's labelled tokens (labels != -100), and their count.

    With ``input_ids`` and ``attention_mask`` also the sum and count over every attended token (the
    whole sequence, prompt included). Row by row in fp32, so at most one row's [seq, vocab]
    log-softmax is alive at once.
    """
    shift = labels[:, 1:]
    mask = shift != IGNORE_INDEX
    index = torch.where(mask, shift, torch.zeros_like(shift))
    every = input_ids is not None
    if every:
        whole = attention_mask[:, 1:].bool() if attention_mask is not None else torch.ones_like(mask)
    sums, all_sums = [], []
    for i in range(logits.shape[0]):
        lp = torch.log_softmax(logits[i, :-1].float(), dim=-1)
        picked = lp.gather(-1, index[i].unsqueeze(-1)).squeeze(-1)
        sums.append((picked * mask[i]).sum())
        if every:
            seq = lp.gather(-1, input_ids[i, 1:].unsqueeze(-1)).squeeze(-1)
            all_sums.append((seq * whole[i]).sum())
    if every:
        return torch.stack(sums), mask.sum(-1), torch.stack(all_sums), whole.sum(-1)
    return torch.stack(sums), mask.sum(-1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (switching at -log 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _smoothed_sigmoid(d: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)


def preference_losses(
    kind: str,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    n_chosen: torch.Tensor,
    n_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    sft_weight: float = 1.0,
    chosen_nll: torch.Tensor | None = None,
) -> PairLosses:
    """Per-pair losses, rewards and scores of ``kind`` (see the module docstring).

    ``chosen_nll`` (orpo): the per-token NLL of each whole chosen sequence, prompt included.
    """
    if kind not in LOSS_TYPES:
        raise ValueError(f"unknown preference loss {kind!r}; expected one of {', '.join(LOSS_TYPES)}")
    nc = n_chosen.to(policy_chosen.dtype).clamp(min=1)
    nr = n_rejected.to(policy_rejected.dtype).clamp(min=1)
    if kind in REFERENCE_FREE:
        ac, ar = policy_chosen / nc, policy_rejected / nr
        if kind == "simpo":
            loss = _smoothed_sigmoid(ac - ar - gamma / beta, beta, label_smoothing)
            return PairLosses(loss, beta * ac, beta * ar, ac, ar)
        if chosen_nll is None:
            raise ValueError("loss 'orpo' needs chosen_nll, the chosen sequences' per-token NLL")
        log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
        ratio = F.logsigmoid(log_odds)
        extra = {"nll_loss": chosen_nll, "log_odds_ratio": ratio, "log_odds_chosen": log_odds}
        return PairLosses(sft_weight * chosen_nll - beta * ratio, beta * ac, beta * ar, ac, ar, extra)
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"loss {kind!r} needs the reference log-probs")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if kind == "sigmoid":
        loss = _smoothed_sigmoid(chosen_ratio - rejected_ratio, beta, label_smoothing)
    else:  # ipo
        loss = (chosen_ratio / nc - rejected_ratio / nr - 1 / (2 * beta)) ** 2
    return PairLosses(loss, beta * chosen_ratio, beta * rejected_ratio, policy_chosen, policy_rejected)
