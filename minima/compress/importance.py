"""Importance scores for structured pruning of a LLaMA-layout model (LLaMA, Mistral, Qwen2, Qwen3),
streamed over calibration batches.

Every data-driven score is a running sum kept by forward hooks (one vector per layer), so memory does
not grow with the number of calibration tokens and no full activation is ever stored.

Scores (``Importance``; L layers, H heads, N MLP neurons, D hidden channels):

- ``activation`` (Minitron): per attention head, the mean over tokens of the L2 norm of the head's
  output (the head's slice of the ``o_proj`` input); per MLP neuron, the mean |act(gate)*up| (the
  ``down_proj`` input); per hidden channel, the mean |x_c| of every RMSNorm input (the residual stream
  where it is read), kept per layer so that only the layers that survive count.
- ``gradient`` (MiniMA): all-ones gates multiply each head's output, each neuron and each hidden
  channel (one gate shared by every residual write: embedding, ``o_proj`` and ``down_proj`` outputs,
  i.e. exactly the "masked teacher" of the hidden-channel pruning). The score is the mean over
  calibration *sequences* of |d loss / d gate| (each sequence's mean next-token loss), each layer's
  heads and neurons divided by their L2 norm. The absolute value is taken per sequence, as in Michel
  et al. (2019): taken per batch, opposite signs of different sequences cancel and a trained
  model's batch gradient is close to zero for important and unimportant units alike.
- ``magnitude``: squared L2 norm of all weights that read or write the unit (no data), q/k/v biases
  (Qwen2) included with their head.
- ``random``: uniform noise from the seed (the baseline).

``block_influence`` (ShortGPT / Minitron) is 1 - cos(layer input, layer output), averaged over tokens;
a low value means the layer barely changes the residual stream and is the first to drop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from minima.core.logs import progress

METHODS = ("activation", "gradient", "magnitude", "random")


@dataclass
class Importance:
    """Scores of one teacher. Tensors are float32 on the CPU.

    Attributes:
        method: which score (see the module docstring).
        heads: [L, H] per attention head.
        neurons: [L, N] per MLP neuron.
        hidden_global: [D] part of the hidden-channel score that does not belong to a layer.
        hidden_layers: [L, D] per-layer parts (None for methods that give one global vector).
        block_influence: [L] or None when not computed.
        tokens: calibration tokens seen (0 for data-free methods).
        seconds: wall time of the calibration pass.
    """

    method: str
    heads: torch.Tensor
    neurons: torch.Tensor
    hidden_global: torch.Tensor
    hidden_layers: Optional[torch.Tensor] = None
    block_influence: Optional[torch.Tensor] = None
    tokens: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def hidden(self, keep_layers: Optional[list[int]] = None) -> torch.Tensor:
        """Hidden-channel score counting only the kept layers (all layers when None)."""
        if self.hidden_layers is None:
            return self.hidden_global.clone()
        rows = self.hidden_layers if keep_layers is None else self.hidden_layers[list(keep_layers)]
        return self.hidden_global + rows.sum(0)

    def kv_groups(self, num_key_value_heads: int) -> torch.Tensor:
        """[L, K]: a KV group's score is the sum of its query heads' scores."""
        L, H = self.heads.shape
        return self.heads.view(L, num_key_value_heads, H // num_key_value_heads).sum(-1)


# ------------------------------------------------------------------------------------------ batches
def as_batch(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) on ``device`` from a dict, a tensor or a list of token lists."""
    if isinstance(batch, dict):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
    else:
        ids, mask = batch, None
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask, dtype=torch.long)
    return ids.to(device), mask.to(device)


def _layers(model):
    return model.model.layers


def _shape(model) -> tuple[int, int, int, int, int, int]:
    c = model.config
    L, H, K, D, N = (
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.hidden_size,
        c.intermediate_size,
    )
    hd = getattr(c, "head_dim", None) or D // H
    return L, H, K, D, N, hd


def _masked_sum(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Sum of x[b, t, ...] * w[b, t] over (b, t), accumulated in float32."""
    return (x * w.to(x.dtype).view(*w.shape, *([1] * (x.dim() - 2)))).sum((0, 1), dtype=torch.float32)


def _first(args, kwargs, name):
    return args[0] if args else kwargs[name]


def _out(output):
    return output[0] if isinstance(output, tuple) else output


# ------------------------------------------------------------------------------------------- hooks
class _Hooks:
    """Registers hooks, removes them on exit; ``self.w`` is the current batch's token mask [B, T]."""

    def __init__(self):
        self.handles: list = []
        self.w: Optional[torch.Tensor] = None

    def add(self, handle):
        self.handles.append(handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _block_influence_hooks(model, hooks: _Hooks, sums: torch.Tensor) -> None:
    for i, layer in enumerate(_layers(model)):

        def hook(mod, args, kwargs, output, i=i):
            x_in = _first(args, kwargs, "hidden_states").detach().float()
            x_out = _out(output).detach().float()
            cos = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)  # [B, T]
            sums[i] += ((1 - cos) * hooks.w).sum()

        hooks.add(layer.register_forward_hook(hook, with_kwargs=True))


def _activation_hooks(model, hooks: _Hooks, heads, neurons, hidden_layers, hidden_global) -> None:
    L, H, K, D, N, hd = _shape(model)
    for i, layer in enumerate(_layers(model)):

        def head_hook(mod, args, i=i):
            x = args[0].detach()
            norms = x.view(*x.shape[:-1], H, hd).float().norm(dim=-1)  # [B, T, H]
            heads[i] += _masked_sum(norms, hooks.w)

        def neuron_hook(mod, args, i=i):
            neurons[i] += _masked_sum(args[0].detach().abs(), hooks.w)

        def norm_hook(mod, args, kwargs, i=i):
            hidden_layers[i] += _masked_sum(_first(args, kwargs, "hidden_states").detach().abs(), hooks.w)

        hooks.add(layer.self_attn.o_proj.register_forward_pre_hook(head_hook))
        hooks.add(layer.mlp.down_proj.register_forward_pre_hook(neuron_hook))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            hooks.add(norm.register_forward_pre_hook(norm_hook, with_kwargs=True))

    def final_norm_hook(mod, args, kwargs):
        hidden_global.add_(_masked_sum(_first(args, kwargs, "hidden_states").detach().abs(), hooks.w))

    hooks.add(model.model.norm.register_forward_pre_hook(final_norm_hook, with_kwargs=True))


def _gradient_hooks(model, hooks: _Hooks, per_seq: dict) -> None:
    """Per-sequence d loss / d gate of all-ones gates, read off activation gradients.

    A gate g multiplying an activation x at every position has d loss / d g = sum_t <dL/dx_t, x_t>;
    summing over the positions of one sequence only gives that sequence's own gradient (sequences do
    not interact), so one backward pass yields every per-sequence gradient without gate tensors.
    """
    L, H, K, D, N, hd = _shape(model)

    def on_grad(x: torch.Tensor, key, view=None):
        xd = x.detach()  # the closure must not hold x itself: x -> its hook -> x is a cycle that keeps
        # every batch's activations alive until the cyclic GC happens to run

        def hook(grad):
            prod = grad.float() * xd.float()
            if view is not None:
                prod = prod.view(*prod.shape[:-1], *view).sum(-1)
            g = prod.sum(1)  # [B, units]: per sequence
            per_seq[key] = per_seq[key] + g if key in per_seq else g

        x.register_hook(hook)

    def hidden_site(mod, args, output):
        out = _out(output)
        if out.requires_grad:
            on_grad(out, "hidden")

    def embed(mod, args, output):
        # the weights are frozen: a leaf here makes everything downstream carry gradients
        out = output.detach().requires_grad_(True)
        on_grad(out, "hidden")
        return out

    hooks.add(model.model.embed_tokens.register_forward_hook(embed))
    for i, layer in enumerate(_layers(model)):

        def head_site(mod, args, i=i):
            on_grad(args[0], ("heads", i), (H, hd))

        def neuron_site(mod, args, i=i):
            on_grad(args[0], ("neurons", i))

        hooks.add(layer.self_attn.o_proj.register_forward_pre_hook(head_site))
        hooks.add(layer.mlp.down_proj.register_forward_pre_hook(neuron_site))
        hooks.add(layer.self_attn.o_proj.register_forward_hook(hidden_site))
        hooks.add(layer.mlp.down_proj.register_forward_hook(hidden_site))


def _per_sequence_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over sequences of each sequence's mean next-token loss (so d/d gate is per-sequence)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    return (ce.sum(1) / (labels != -100).sum(1).clamp_min(1)).sum()


# ---------------------------------------------------------------------------------------- scoring
def magnitude_importance(model) -> Importance:
    """Squared L2 norms of the weights that read or write each head, neuron and hidden channel."""
    L, H, K, D, N, hd = _shape(model)
    G = H // K
    heads, neurons, hidden_layers = torch.zeros(L, H), torch.zeros(L, N), torch.zeros(L, D)
    sq = lambda t: t.detach().float().pow(2)
    with torch.no_grad():
        for i, layer in enumerate(_layers(model)):
            a, m = layer.self_attn, layer.mlp
            q, k, v, o = sq(a.q_proj.weight), sq(a.k_proj.weight), sq(a.v_proj.weight), sq(a.o_proj.weight)
            kv = k.view(K, hd, D).sum((1, 2)) + v.view(K, hd, D).sum((1, 2))
            qh = q.view(H, hd, D).sum((1, 2))
            for proj, acc in ((a.q_proj, qh), (a.k_proj, kv), (a.v_proj, kv)):
                if proj.bias is not None:
                    acc += sq(proj.bias).view(-1, hd).sum(1)
            heads[i] = (qh + o.view(D, H, hd).sum((0, 2)) + (kv / G).repeat_interleave(G)).cpu()
            gate, up, down = sq(m.gate_proj.weight), sq(m.up_proj.weight), sq(m.down_proj.weight)
            neurons[i] = (gate.sum(1) + up.sum(1) + down.sum(0)).cpu()
            cols = q.sum(0) + k.sum(0) + v.sum(0) + gate.sum(0) + up.sum(0)  # weights that read channel c
            rows = o.sum(1) + down.sum(1)  # weights that write channel c
            norms = sq(layer.input_layernorm.weight) + sq(layer.post_attention_layernorm.weight)
            hidden_layers[i] = (cols + rows + norms).cpu()
        emb = sq(model.model.embed_tokens.weight).sum(0) + sq(model.model.norm.weight)
        head = model.get_output_embeddings()
        if head is not None and head.weight is not model.model.embed_tokens.weight:
            emb = emb + sq(head.weight).sum(0)
    return Importance("magnitude", heads, neurons, emb.cpu(), hidden_layers)


def random_importance(model, seed: int = 0) -> Importance:
    """Uniform noise: the baseline that any real score must beat."""
    L, H, K, D, N, hd = _shape(model)
    g = torch.Generator().manual_seed(seed)
    return Importance(
        "random", torch.rand(L, H, generator=g), torch.rand(L, N, generator=g), torch.rand(D, generator=g)
    )


def calibrate(
    model,
    batches: Optional[Iterable[Any]],
    method: str = "activation",
    block_influence: bool = True,
    total: Optional[int] = None,
    seed: int = 0,
) -> Importance:
    """Score heads, neurons, hidden channels (and layers) of a LLaMA-layout model.

    Args:
        model: a ``LlamaForCausalLM`` (or Mistral/Qwen2/Qwen3; any device/dtype); left unchanged.
        batches: calibration batches (dicts with ``input_ids`` and optional ``attention_mask``, or
            id tensors); only iterated when the method or ``block_influence`` needs data.
        method: activation | gradient | magnitude | random.
        block_influence: also compute the per-layer block influence (needs data).
        total: number of batches, for the progress bar's ETA.
        seed: seed of the random baseline.
    """
    if method not in METHODS:
        raise ValueError(f"unknown importance {method!r}; choose one of {METHODS}")
    needs_data = method in ("activation", "gradient") or block_influence
    if method == "magnitude":
        imp = magnitude_importance(model)
    elif method == "random":
        imp = random_importance(model, seed)
    else:
        imp = None
    if not needs_data:
        return imp
    if batches is None:
        raise ValueError(f"importance={method!r} / block influence needs calibration batches")

    L, H, K, D, N, hd = _shape(model)
    device = next(model.parameters()).device
    acc = dict(
        heads=torch.zeros(L, H, device=device),
        neurons=torch.zeros(L, N, device=device),
        hidden_layers=torch.zeros(L, D, device=device),
        hidden_global=torch.zeros(D, device=device),
        bi=torch.zeros(L, device=device),
    )
    grad = method == "gradient"
    per_seq: dict = {}
    tokens, nbatches, nseqs, t0 = 0, 0, 0, time.time()
    was_training = model.training
    req = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)  # only the gates need gradients; no weight grads are allocated
    try:
        with _Hooks() as hooks:
            if block_influence:
                _block_influence_hooks(model, hooks, acc["bi"])
            if method == "activation":
                _activation_hooks(
                    model, hooks, acc["heads"], acc["neurons"], acc["hidden_layers"], acc["hidden_global"]
                )
            if grad:
                _gradient_hooks(model, hooks, per_seq)
            for batch in progress(batches, desc=f"calibration ({method})", total=total, unit="batch"):
                ids, mask = as_batch(batch, device)
                hooks.w = mask.float()
                tokens += int(mask.sum())
                nbatches += 1
                nseqs += int((mask.sum(1) > 1).sum())
                if grad:
                    per_seq.clear()
                    _per_sequence_loss(model, ids, mask).backward()
                    with torch.no_grad():
                        for i in range(L):
                            acc["heads"][i] += per_seq[("heads", i)].abs().sum(0)
                            acc["neurons"][i] += per_seq[("neurons", i)].abs().sum(0)
                        acc["hidden_global"] += per_seq["hidden"].abs().sum(0)
                    per_seq.clear()
                else:
                    with torch.no_grad():
                        model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    if nbatches == 0:
        raise ValueError("the calibration data is empty")
    seconds = time.time() - t0
    cpu = {k: v.detach().float().cpu() for k, v in acc.items()}
    bi = cpu["bi"] / tokens if block_influence else None
    if method == "activation":
        imp = Importance(
            "activation",
            cpu["heads"] / tokens,
            cpu["neurons"] / tokens,
            cpu["hidden_global"] / tokens,
            cpu["hidden_layers"] / tokens,
        )
    elif method == "gradient":
        nseqs = max(nseqs, 1)
        heads, neurons = cpu["heads"] / nseqs, cpu["neurons"] / nseqs
        # per-layer L2 normalisation (Michel et al. 2019) makes layers comparable in the report
        heads = heads / heads.norm(dim=1, keepdim=True).clamp_min(1e-30)
        neurons = neurons / neurons.norm(dim=1, keepdim=True).clamp_min(1e-30)
        hidden = cpu["hidden_global"] / nseqs
        imp = Importance("gradient", heads, neurons, hidden / hidden.norm().clamp_min(1e-30))
    imp.block_influence, imp.tokens, imp.seconds = bi, tokens, seconds
    imp.extra["batches"] = nbatches
    return imp


def iter_limit(it: Iterable[Any], n: int) -> Iterator[Any]:
    """The first ``n`` items of an iterable."""
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x
