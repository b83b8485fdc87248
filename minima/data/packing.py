"""Packing several short conversations into one sequence with no attention between them.

Each packed sequence carries per-document ``position_ids`` (restarting at 0 for every conversation)
and a document id per token. Attention is made block-diagonal in one of two ways:

- ``mask="varlen"`` (what training uses with SDPA and eager): no attention mask, only
  ``position_ids``; transformers finds the document boundaries itself and builds the block mask;
- ``mask="flash"`` (flash-attention 2/3): ``position_ids`` plus the documents' cumulative lengths
  over the flattened batch and the longest document, computed on the host by :func:`collate_packed`.
  transformers then runs flash-attention's varlen kernel over the whole micro batch with no device
  read per layer; from ``position_ids`` alone it only does so for a micro batch of one row, and runs
  plain causal flash-attention across documents otherwise;
- ``mask="4d"``: an explicit additive ``(B, 1, L, L)`` mask, causal inside each document and -inf
  across documents (a reference for tests).

Only models whose positions come from ``position_ids`` (rotary: LLaMA, Mistral, Qwen2 ...) can be
packed; ALiBi (Bloom) and learned-from-mask positions (OPT) would leak across documents.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Optional

import torch

from minima.core.errors import ConfigError

PACKABLE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "mixtral"}


def check_packable(model_config) -> None:
    """Raise ConfigError when a model family cannot be packed without cross-document leakage."""
    mt = getattr(model_config, "model_type", "?")
    if getattr(model_config, "is_encoder_decoder", False) or mt not in PACKABLE:
        raise ConfigError(
            f"packing=true needs a rotary-position decoder (one of {sorted(PACKABLE)}); this model is {mt!r}",
            where="sft.packing",
            fix="set packing=false for this model family",
        )


def pack(examples: Iterable[dict], max_length: int) -> Iterator[dict]:
    """Greedily pack examples (in order) into sequences of at most ``max_length`` tokens.

    Args:
        examples: dicts with 1-D ``input_ids`` and ``labels`` (lists or tensors); each must fit.
        max_length: token budget of one packed sequence.

    Yields:
        dicts with ``input_ids``, ``labels``, ``position_ids`` and ``doc_ids`` (LongTensors) and
        ``num_docs``.
    """
    buf: list[dict] = []
    used = 0
    for ex in examples:
        n = len(ex["input_ids"])
        if n > max_length:
            raise ValueError(f"example of {n} tokens does not fit max_length={max_length}")
        if used + n > max_length and buf:
            yield concat(buf)
            buf, used = [], 0
        buf.append(ex)
        used += n
    if buf:
        yield concat(buf)


def concat(docs: list[dict]) -> dict:
    """One packed sequence from a list of documents."""
    import torch

    ids, labels, pos, doc = [], [], [], []
    for i, d in enumerate(docs):
        x = torch.as_tensor(d["input_ids"], dtype=torch.long)
        y = torch.as_tensor(d["labels"], dtype=torch.long)
        # The first label of each document must not be predicted from the previous document's last
        # token; the causal shift in the loss would otherwise train across the boundary.
        y = y.clone()
        y[0] = -100
        ids.append(x)
        labels.append(y)
        pos.append(torch.arange(len(x)))
        doc.append(torch.full((len(x),), i))
    return {
        "input_ids": torch.cat(ids),
        "labels": torch.cat(labels),
        "position_ids": torch.cat(pos),
        "doc_ids": torch.cat(doc),
        "num_docs": len(docs),
    }


def collate_packed(batch: list[dict], pad_id: int) -> dict:
    """Pad packed sequences to the longest; padding is a document of its own (id -1, labels -100)."""
    import torch

    L = max(len(b["input_ids"]) for b in batch)
    out = {
        k: torch.full((len(batch), L), v, dtype=torch.long)
        for k, v in (("input_ids", pad_id), ("labels", -100), ("position_ids", 0), ("doc_ids", -1))
    }
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        for k in ("input_ids", "labels", "position_ids", "doc_ids"):
            out[k][i, :n] = torch.as_tensor(b[k])
        # Padding positions count up so transformers' varlen detection sees one more document.
        out["position_ids"][i, n:] = torch.arange(L - n)
    out["cu_seq_lens"], out["max_length"] = varlen_lengths(out["position_ids"])
    return out


def varlen_lengths(position_ids):
    """Cumulative document lengths over the flattened ``[B, L]`` batch (int32) and the longest document.

    Every document, and every row's padding, starts at position 0, so the starts are where the
    flattened position ids are 0. Computed on the host while collating: the GPU never waits on it.
    """
    import torch

    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().reshape(-1)
    cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def block_diagonal_mask(doc_ids, dtype=None):
    """Additive ``(B, 1, L, L)`` mask: 0 where query and key are in the same document and key <= query.

    Padding (doc id -1) attends to itself only, so no row is fully masked (softmax stays finite).
    """
    import torch

    dtype = dtype or torch.float32
    B, L = doc_ids.shape
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=doc_ids.device).tril()
    allowed = same & causal
    mask = torch.zeros(B, 1, L, L, dtype=dtype, device=doc_ids.device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return mask


def model_inputs(batch: dict, mode: str = "4d", dtype=None) -> dict:
    """The forward kwargs for a packed batch: ids, position ids and the mask of the chosen mode."""
    # No KV cache: transformers only looks for packed documents in position_ids when there is none.
    kw = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if mode == "4d":
        kw["attention_mask"] = block_diagonal_mask(batch["doc_ids"], dtype)
    elif mode == "flash":  # the lengths collate_packed computed on the host
        cu, longest = batch["cu_seq_lens"].to(batch["input_ids"].device, non_blocking=True), batch["max_length"]
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    elif mode != "varlen":
        raise ValueError(f"unknown packing mask mode {mode!r}")
    return kw


def mask_mode(model) -> str:
    """``flash`` for flash-attention implementations, else ``varlen``: no dense (B, 1, L, L) mask either way.

    Flash-attention gets the documents' lengths precomputed (see the module doc); SDPA and eager get
    ``position_ids`` and transformers builds their block-diagonal mask (tests/test_packing.py checks the
    logits of every mode); a dense float mask handed to SDPA would also keep it off its fastest kernels.
    """
    impl = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    return "flash" if "flash" in impl else "varlen"  # transformers' own test (is_flash_attention_requested)


class PackedDataset(torch.utils.data.IterableDataset):
    """Wrap an iterable dataset of examples into packed sequences, with resumable state.

    The state is the inner dataset's state plus the examples already read but not yet emitted, so a
    restart continues with exactly the next packed sequence.
    """

    def __init__(self, inner, max_length: int, transform=None):
        self.inner, self.max_length, self.transform = inner, max_length, transform
        self._pending: list[dict] = []
        self._restored: Optional[list[dict]] = None

    def __iter__(self):
        self._pending, self._restored = list(self._restored or []), None
        used = sum(len(d["input_ids"]) for d in self._pending)
        for ex in self.inner:
            ex = self.transform(ex) if self.transform else ex
            ex = {"input_ids": ex["input_ids"][: self.max_length], "labels": ex["labels"][: self.max_length]}
            n = len(ex["input_ids"])
            if used + n > self.max_length and self._pending:
                out = concat(self._pending)
                # The example just read is already consumed from the inner dataset, so it joins the
                # pending list before the yield: a state_dict taken while we are suspended keeps it.
                self._pending, used = [ex], n
                yield out
                continue
            self._pending.append(ex)
            used += n
        if self._pending:
            out, self._pending = concat(self._pending), []
            yield out

    def state_dict(self) -> dict:
        return {
            "inner": self.inner.state_dict(),
            "pending": [
                {"input_ids": list(map(int, d["input_ids"])), "labels": list(map(int, d["labels"]))}
                for d in self._pending
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self._restored = [dict(d) for d in state.get("pending", [])]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)
