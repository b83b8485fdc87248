"""Parameter and FLOP counts of a model or of a config (built on the meta device: exact shapes, no memory).

``flops_per_token`` is the PaLM count (appendix B): ``6N + 12 L d T`` per trained token, where N
is :func:`non_embedding_params` (the embedding lookup is not a matmul; an untied ``lm_head`` is),
and ``12 L d T`` the attention scores and values over a context of T. A forward pass alone (a
teacher) is a third of it: ``2N + 4 L d T``.
"""

from __future__ import annotations

from typing import Any


def meta_model(config):
    """The HF model of ``config`` on the meta device (encoder-decoder configs get the seq2seq class)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):
        return cls.from_config(config)


def _as_model(config_or_model: Any):
    import torch

    return config_or_model if isinstance(config_or_model, torch.nn.Module) else meta_model(config_or_model)


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions parameters; ds_numel is the full size


def count_params(config_or_model: Any) -> int:
    """All parameters (a tied input/output embedding counted once) of a model, or of the model a config builds."""
    return sum(_numel(p) for p in _as_model(config_or_model).parameters())


def non_embedding_params(config_or_model: Any) -> int:
    """Parameters minus the input embedding (with tied embeddings the shared matrix is left out once)."""
    model = _as_model(config_or_model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_ids = {id(p) for p in emb.parameters()} if emb is not None else set()
    return sum(_numel(p) for p in model.parameters() if id(p) not in emb_ids)


def flops_per_token(config, n_params: int, seq_len: int, backward: bool = True) -> float:
    """FLOPs per token: ``6N + 12 L d T`` for training, ``2N + 4 L d T`` for a forward pass only.

    Args:
        config: an HF config (``num_hidden_layers``, ``hidden_size``; missing ones count 0).
        n_params: N, normally :func:`non_embedding_params`.
        seq_len: T, the context length.
        backward: count the backward pass too (training).
    """
    layers = getattr(config, "num_hidden_layers", 0) or 0
    hidden = getattr(config, "hidden_size", 0) or 0
    k = 3.0 if backward else 1.0  # the backward pass costs twice the forward
    return 2.0 * k * n_params + 4.0 * k * layers * hidden * seq_len
