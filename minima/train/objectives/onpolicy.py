"""On-policy distillation (GKD): the student samples continuations of record prefixes, the teacher scores them.

A micro-batch is on-policy with probability ``fraction`` (GKD's lambda). The draw is a hash of
(seed, optimizer step, micro-batch index), so every rank takes the same decision for the same micro
step (sharded models run their forwards as collectives, so all ranks must generate together) and a
resumed run decides as an uninterrupted one. The prefix of each row is the record's first
``P = max(1, shortest real row length - new_tokens)`` tokens, and the student then samples exactly
``new_tokens`` tokens: every rank runs the same number of decoding forwards, and the number of
label tokens (``batch rows * new_tokens``) is known before the forward, as the loop's loss
normalisation requires.

Sampling uses Hugging Face ``generate`` on the model being trained rather than the serving engine
(:mod:`minima.infer.engine`): the engine decodes on its own scheduler thread and retires sequences
as they finish, while a sharded training model (FSDP2, ZeRO-3) must run every forward on the
calling thread in lockstep with the other ranks. End-of-sequence tokens do not stop a row, so the
continuation is the student's unconstrained distribution for ``new_tokens`` steps.
"""

from __future__ import annotations

import hashlib

import torch

IGNORE_INDEX = -100


def _unit(*parts) -> float:
    h = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0**64


def is_on_policy(seed: int, step: int, micro: int, fraction: float) -> bool:
    """Whether micro-batch ``micro`` of optimizer step ``step`` (0-based) samples from the student."""
    if fraction <= 0.0:
        return False
    return fraction >= 1.0 or _unit("on-policy", seed, step, micro) < fraction


def sample_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The sampling seed of one rank's micro-batch (different rows on every rank, reproducible)."""
    return int(_unit("sample", seed, step, micro, rank) * 2**62)


def prefix_length(attention_mask: torch.Tensor, new_tokens: int) -> int:
    """Prompt length shared by the batch's rows: all of it real tokens, leaving room for ``new_tokens``."""
    shortest = int(attention_mask.sum(dim=1).min().item())
    return max(1, shortest - new_tokens)


@torch.no_grad()
def sample_continuations(
    model, prefix: torch.Tensor, new_tokens: int, temperature: float, seed: int, pad_id: int = 0
) -> torch.Tensor:
    """[B, P] prefixes -> [B, P + new_tokens] with the student's samples appended (reproducible for a seed)."""
    hf = getattr(model, "module", model)  # a DeepSpeed engine holds the HF model as .module
    was_training = hf.training
    hf.eval()
    devices = [prefix.device] if prefix.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = hf.generate(
                input_ids=prefix,
                attention_mask=torch.ones_like(prefix),
                do_sample=True,
                temperature=float(temperature),
                top_k=0,
                top_p=1.0,
                max_new_tokens=int(new_tokens),
                min_new_tokens=0,
                eos_token_id=None,  # an end-of-sequence token does not end the row
                pad_token_id=int(pad_id),
                use_cache=True,
            )
    finally:
        hf.train(was_training)
    if out.shape[1] != prefix.shape[1] + new_tokens:  # generate stopped early: refuse rather than mis-count
        raise RuntimeError(f"generate returned {out.shape[1] - prefix.shape[1]} new tokens, expected {new_tokens}")
    return out


def on_policy_batch(batch: dict, sequences: torch.Tensor, prefix_len: int) -> dict:
    """The batch the loss runs on: the sampled sequences, labels on the sampled tokens only."""
    labels = torch.full_like(sequences, IGNORE_INDEX)
    labels[:, prefix_len:] = sequences[:, prefix_len:]
    return {"input_ids": sequences, "attention_mask": torch.ones_like(sequences), "labels": labels}
