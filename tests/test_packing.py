"""Packing: packed logits equal the unpacked ones; the packed dataset resumes exactly."""

from __future__ import annotations

import pytest
import torch

from minima.core.errors import ConfigError
from minima.data.packing import (
    PackedDataset,
    block_diagonal_mask,
    check_packable,
    collate_packed,
    model_inputs,
    pack,
)
from minima.testing import tiny_family_model, tiny_llama


@pytest.fixture(autouse=True)
def _one_thread():
    # One thread: on a shared 2-core machine a second thread makes tiny models ~10x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _docs(n=5, vocab=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(3, vocab, (L,), generator=g)
        labels = ids.clone()
        labels[: L // 2] = -100  # a "prompt" part without labels
        out.append({"input_ids": ids, "labels": labels})
    return out


def _assert_documents_match(logits, packed, docs, ref):
    """Walk the packed rows and compare each document's slice with its own forward pass."""
    k = 0
    for row, p in enumerate(packed):
        start = 0
        for _ in range(p["num_docs"]):
            n = len(docs[k]["input_ids"])
            torch.testing.assert_close(logits[row, start : start + n], ref[k], atol=1e-5, rtol=1e-4)
            start += n
            k += 1
    assert k == len(docs)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", ["4d", "varlen"])
def test_packed_logits_equal_unpacked(attn, mode):
    torch.manual_seed(0)
    model = tiny_llama(200, seed=1, **SMALL)
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    docs = _docs()
    packed = list(pack(docs, max_length=24))
    assert len(packed) >= 2 and any(p["num_docs"] > 1 for p in packed)
    batch = collate_packed(packed, pad_id=0)
    with torch.no_grad():
        logits = model(**model_inputs(batch, mode)).logits
        ref = [model(input_ids=d["input_ids"][None]).logits[0] for d in docs]
    _assert_documents_match(logits, packed, docs, ref)

    # The summed loss is the same too (the first label of a packed document is never predicted
    # from the previous document).
    def ce_sum(lg, lb):
        return torch.nn.functional.cross_entropy(lg[:-1], lb[1:], ignore_index=-100, reduction="sum")

    packed_loss = sum(ce_sum(logits[r], batch["labels"][r]) for r in range(len(packed)))
    ref_loss = sum(ce_sum(ref[i], d["labels"]) for i, d in enumerate(docs))
    torch.testing.assert_close(packed_loss, ref_loss, atol=1e-4, rtol=1e-5)


def test_without_block_mask_documents_leak():
    """Guard that the test above can fail: plain causal attention over the pack changes the logits."""
    model = tiny_llama(200, seed=1, **SMALL)
    docs = _docs()
    p = next(iter(pack(docs, max_length=24)))
    with torch.no_grad():
        leaky = model(input_ids=p["input_ids"][None]).logits[0]
        ref = model(input_ids=docs[1]["input_ids"][None]).logits[0]
    n0, n1 = len(docs[0]["input_ids"]), len(docs[1]["input_ids"])
    assert not torch.allclose(leaky[n0 : n0 + n1], ref, atol=1e-3)


def test_block_diagonal_mask_shape():
    doc = torch.tensor([[0, 0, 1, 1, -1]])
    m = block_diagonal_mask(doc) == 0
    expect = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool
    )
    assert torch.equal(m[0, 0], expect)


class _ListDS(torch.utils.data.IterableDataset):
    def __init__(self, items):
        self.items, self.pos = items, 0

    def __iter__(self):
        while self.pos < len(self.items):
            self.pos += 1
            yield self.items[self.pos - 1]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def test_packed_dataset_resumes_exactly():
    docs = _docs(12, seed=3)
    full = [p["input_ids"].tolist() for p in PackedDataset(_ListDS(docs), 20)]
    ds = PackedDataset(_ListDS(docs), 20)
    it = iter(ds)
    first = [next(it)["input_ids"].tolist() for _ in range(2)]
    state = ds.state_dict()
    ds2 = PackedDataset(_ListDS(docs), 20)
    ds2.load_state_dict(state)
    rest = [p["input_ids"].tolist() for p in ds2]
    assert first + rest == full
    assert sum(len(x) for x in full) == sum(len(d["input_ids"]) for d in docs)


def test_unpackable_family_is_an_error():
    with pytest.raises(ConfigError, match="packing=true"):
        check_packable(tiny_family_model("bloom", 100).config)
    check_packable(tiny_llama(100, **SMALL).config)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_training_inputs_have_no_dense_mask(attn):
    """Packed SFT passes position_ids only (flash varlen on GPU): no [B, 1, L, L] float mask for any
    attention implementation; test_packed_logits_equal_unpacked checks varlen's logits."""
    from minima.data.packing import mask_mode

    model = tiny_llama(200, seed=1, **SMALL)
    model.set_attn_implementation(attn)
    batch = collate_packed(list(pack(_docs(), max_length=24)), pad_id=0)
    kw = model_inputs(batch, mask_mode(model))
    assert "attention_mask" not in kw and kw["position_ids"].shape == batch["input_ids"].shape


def test_varlen_lengths_equal_transformers_flash_kwargs():
    """The collated cumulative lengths are what transformers would derive from the flattened position ids."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    batch = collate_packed(list(pack(_docs(9, seed=4), max_length=24)), pad_id=0)
    assert batch["input_ids"].shape[0] >= 3
    (cu_q, cu_k), (max_q, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert batch["cu_seq_lens"].dtype == torch.int32
    assert torch.equal(batch["cu_seq_lens"], cu_q) and torch.equal(cu_q, cu_k)
    assert batch["max_length"] == int(max_q) and isinstance(batch["max_length"], int)
    # every document and every row's padding is one segment
    docs_and_pads = sum(int(d.unique().numel()) for d in batch["doc_ids"])
    assert len(batch["cu_seq_lens"]) - 1 == docs_and_pads


def _reference_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """flash_attn_varlen_func's contract in plain torch: causal attention inside each [cu[i], cu[i+1]) of the
    flattened batch. Fails when the lengths are missing or must be read from the device (a tensor max)."""
    cu, longest = kw.get("cu_seq_lens_q"), kw.get("max_length_q")
    assert cu is not None and isinstance(longest, int), "packed flash attention without precomputed lengths"
    # transformers takes the varlen path only when all four are given (self-attention: k equals q)
    assert torch.equal(kw.get("cu_seq_lens_k"), cu) and kw.get("max_length_k") == longest
    B, H, L, D = query.shape
    rep = H // key.shape[1]
    q = query.transpose(1, 2).reshape(B * L, H, D)
    k = key.repeat_interleave(rep, dim=1).transpose(1, 2).reshape(B * L, H, D)
    v = value.repeat_interleave(rep, dim=1).transpose(1, 2).reshape(B * L, H, D)
    out = torch.empty_like(q)
    bounds = cu.tolist()
    assert max(b - a for a, b in zip(bounds[:-1], bounds[1:])) == longest
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True, scale=scaling
        )
        out[a:b] = seg.transpose(0, 1)
    return out.reshape(B, L, H, D), None


def test_flash_packing_passes_lengths_and_keeps_documents_apart():
    """Under a flash-attention implementation packed SFT hands transformers the documents' lengths: a varlen
    kernel (here flash's contract in plain torch) then gives each document its own unpacked logits, for a
    micro batch of several rows."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    from minima.data.packing import mask_mode

    name = "flash_reference_varlen"
    AttentionInterface.register(name, _reference_varlen_attention)
    AttentionMaskInterface.register(name, flash_attention_mask)
    model = tiny_llama(200, seed=1, **SMALL)
    docs = _docs(9, seed=4)
    packed = list(pack(docs, max_length=24))
    batch = collate_packed(packed, pad_id=0)
    with torch.no_grad():
        ref = [model(input_ids=d["input_ids"][None]).logits[0] for d in docs]
        model.config._attn_implementation = name
        assert mask_mode(model) == "flash"
        kw = model_inputs(batch, mask_mode(model))
        assert "attention_mask" not in kw
        logits = model(**kw).logits
    assert len(packed) >= 3
    _assert_documents_match(logits, packed, docs, ref)
