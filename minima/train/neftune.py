"""NEFTune: uniform noise on the input embeddings during training (Jain et al., 2023).

The noise is ``Uniform(-1, 1) * alpha / sqrt(L * d)`` where ``L`` is the sequence length of the
batch and ``d`` the embedding width. It is added by a forward hook on the input embedding module and
only while that module is in training mode, so ``model.eval()`` and ``generate`` see the clean
embeddings with no extra switch to remember.
"""

from __future__ import annotations

import math
from typing import Optional


def _embedding_module(model):
    """The input embedding of a (possibly peft-wrapped) transformers model."""
    base = model
    # peft: PeftModel.get_input_embeddings works, but keep it explicit for plain nn.Modules too.
    getter = getattr(base, "get_input_embeddings", None)
    if getter is None:
        raise TypeError(f"{type(model).__name__} has no get_input_embeddings(); NEFTune needs a transformers model")
    return getter()


def neftune_hook(alpha: float, generator: Optional[object] = None):
    """A forward hook that adds NEFTune noise to the embedding output in training mode."""

    def hook(module, args, output):
        if not module.training or alpha <= 0:
            return output
        import torch

        seq_len, dim = output.shape[-2], output.shape[-1]
        scale = alpha / math.sqrt(seq_len * dim)
        noise = (
            torch.empty_like(output).uniform_(-1.0, 1.0, generator=generator)
            if generator is not None
            else torch.empty_like(output).uniform_(-1.0, 1.0)
        )
        return output + noise * scale

    return hook


def attach_neftune(model, alpha: float, generator=None):
    """Register the NEFTune hook on ``model``'s input embeddings; returns the hook handle (or None).

    Args:
        model: a transformers model (plain or peft-wrapped).
        alpha: the noise alpha (NEFTune used 5); 0 attaches nothing.
        generator: optional ``torch.Generator`` for reproducible noise.
    """
    if alpha <= 0:
        return None
    emb = _embedding_module(model)
    handle = emb.register_forward_hook(neftune_hook(alpha, generator))
    emb._minima_neftune = handle  # lets tests and export find and remove it
    return handle


def detach_neftune(model) -> None:
    """Remove the NEFTune hook, if any (before export, so nothing unusual is left on the module)."""
    emb = _embedding_module(model)
    handle = getattr(emb, "_minima_neftune", None)
    if handle is not None:
        handle.remove()
        del emb._minima_neftune
