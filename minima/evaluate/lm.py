"""The scoring engine: loglikelihoods, next-token letter logits, greedy generation and rolling perplexity.

Requests are tokenized exactly as lm-eval's HFLM does (trailing context spaces move to the
continuation, the pair is encoded whole and split at the context's length, contexts are truncated
from the left to ``max_length + 1`` tokens), so the same tokens are scored. What differs is how:

- requests are grouped by context; each context runs **once** (left-padded batches with explicit
  position ids) and its KV cache is copied to all of its continuations, which then run as one batch;
- logits are computed only where they are needed (``logits_to_keep``), and log-softmax in fp32;
- groups are sorted by length and batched; with several processes (torchrun) each rank takes every
  ``world_size``-th group and the results are gathered.

A model sharded over the ranks (ZeRO-3, FSDP2) splits the requests too, but each of its forwards is a
collective (the ranks gather each layer's weights together), so the ranks run in lock step: one
``all_reduce(MAX)`` per request type agrees on the number of batches and, per batch, on how many calls
of each kind (shared-prefix forward, context forward, continuation forward, vocab projections) it makes;
a rank with fewer runs throwaway one-token calls of the same kinds (``pad_calls``).

Models whose forward takes no KV cache fall back to lm-eval's one-sequence-per-request scheme, and
models without ``position_ids`` (Bloom's ALiBi) take their positions from the attention mask.

Encoder-decoder models (T5, BART) are scored as lm-eval's seq2seq backend scores them: the context
(with the tokenizer's special tokens) goes to the encoder, which runs once per distinct context, and
the continuation, encoded on its own with special tokens, is the decoder's target; letter mode reads
the first decoder position, and generation decodes from the encoder's output through the engine.
Rolling perplexity needs a decoder-only model.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Optional

import torch

from minima.core.errors import DataError, InputError

TOKENIZER_INFINITY = 1000000000000000019884624838656
DEFAULT_MAX_LENGTH = 2048


def resolve_max_length(config, tokenizer) -> int:
    """Context length: config n_positions / max_position_embeddings / n_ctx, else the tokenizer's, else 2048."""
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if v is not None:
            return int(v)
    m = getattr(tokenizer, "model_max_length", None)
    if m is not None and m != TOKENIZER_INFINITY and m < 10**9:
        return int(m)
    return DEFAULT_MAX_LENGTH


def dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_sharded(model) -> bool:
    """Whether the model's parameters are sharded over the ranks (DeepSpeed ZeRO-3 partitions, FSDP2 DTensors).

    Every forward of such a model is a collective: all ranks must run the same forwards, in step.
    """
    from torch.distributed.tensor import DTensor

    return any(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in model.parameters())


#: Vocab columns per chunk when scoring whole windows (perplexity): fp32 temporaries stay [tokens, chunk].
SCORE_CHUNK = 8192


def _chunks(seq: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class LM:
    """A Hugging Face causal LM and its tokenizer, scored the lm-eval way, faster.

    Args:
        model: a ``*ForCausalLM`` (eval mode is set; gradients are never taken).
        tokenizer: its tokenizer.
        batch_size: contexts per forward pass (each with all its continuations).
        max_length: context window; default from the model config like lm-eval.
        distributed: split requests across ``torch.distributed`` ranks and gather the results. A model
            sharded over the ranks (ZeRO-3, FSDP) splits them too, its ranks calling the model in lock step
            (padding calls where a rank has less to do), and generates with ``synced_gpus`` so no rank stops
            before the others. Without it every rank runs every request.
    """

    def __init__(
        self, model, tokenizer, batch_size: int = 16, max_length: Optional[int] = None, distributed: bool = False
    ):
        self.model = model.eval()
        self.tok = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.device = next(model.parameters()).device
        self.max_length = int(max_length or resolve_max_length(model.config, tokenizer))
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.prefix_token_id = bos if bos is not None else eos
        self._prefix_str = tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
        params = inspect.signature(model.forward).parameters
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self.positions_ok = "position_ids" in params
        self.cache_ok = "past_key_values" in params and not self.seq2seq
        self.keep_ok = "logits_to_keep" in params
        self.sharded = is_sharded(model)
        group = dist_info()[1]
        self.rank, self.world = dist_info() if distributed else (0, 1)
        self.synced_gpus = self.sharded and group > 1
        self.lockstep = self.sharded and self.world > 1  # every forward is a collective over the ranks
        self.forward_calls = 0  # model forwards (synced generation: generate calls), padding calls included
        self.pad_calls = 0  # throwaway calls that keep a sharded model's ranks in step
        split = self.cache_ok and self._probe_split_head()
        if self.synced_gpus and torch.distributed.is_initialized():  # one call path for all ranks: agree
            flag = torch.tensor([1 if split else 0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            split = bool(flag.item())
        self.split_head = split

    def _probe_split_head(self) -> bool:
        """Whether ``lm_head(base_model(x))`` is the model's logits (no soft-capping or scaling after the head).

        If so, continuations apply the head only at their real (unpadded) positions.
        """
        try:
            base, head = self.model.base_model, self.model.get_output_embeddings()
            if base is self.model or head is None:
                return False
            ids = torch.tensor([[self.prefix_token_id or 0, 1, 2]], device=self.device)
            with torch.inference_mode():
                full = self.model(input_ids=ids).logits.float()
                split = head(base(input_ids=ids).last_hidden_state).float()
            return split.shape == full.shape and bool(torch.allclose(split, full, atol=1e-4, rtol=1e-4))
        except Exception:  # any model this probe does not fit keeps the full forward
            return False

    # ------------------------------------------------------------------ tokenization (lm-eval's rules)
    def tok_encode(self, text: str, add_special_tokens: Optional[bool] = None) -> list[int]:
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and self._prefix_str and text.startswith(self._prefix_str):
            kw["add_special_tokens"] = False  # the text already starts with BOS
        return self.tok.encode(text, **kw)

    def encode_pair(self, context: str, continuation: str, cache: Optional[dict] = None) -> tuple[list[int], list[int]]:
        if context == "":
            return [self.prefix_token_id], self.tok_encode(continuation, add_special_tokens=False)
        n = len(context) - len(context.rstrip())
        if n:
            continuation, context = context[-n:] + continuation, context[:-n]
        whole = self.tok_encode(context + continuation)
        if cache is not None:
            ctx = cache.get(context)
            if ctx is None:
                ctx = cache[context] = self.tok_encode(context)
        else:
            ctx = self.tok_encode(context)
        return ctx, whole[len(ctx) :]

    # ------------------------------------------------------------------ distributed helpers
    def _mine(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.world))

    def _steps(self, n: int) -> int:
        """Batches of the rank with the most of ``n`` items (rank 0): how many steps every rank runs."""
        return math.ceil(math.ceil(n / self.world) / self.batch_size)

    def _agree(self, plans: list[list[int]], n: int, kinds: int) -> list[list[int]]:
        """Collective: per step, the most calls of each kind any rank makes (one ``all_reduce(MAX)``).

        Args:
            plans: per own batch, its number of calls of each of ``kinds`` kinds.
            n: items of the request type (the same on every rank), which bounds the steps.
            kinds: call kinds per step.
        """
        dist = torch.distributed
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.zeros((self._steps(n) + 1, kinds), dtype=torch.long)
        t[0, 0] = len(plans)
        for s, p in enumerate(plans):
            t[s + 1] = torch.tensor(p, dtype=torch.long)
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        t = t.cpu()
        return t[1 : int(t[0, 0]) + 1].tolist()

    def _pad_call(self, kind: str) -> None:
        """A throwaway call of ``kind`` on one token, which keeps this rank's collectives in step.

        Kinds: ``model`` (a full forward), ``base`` (the model without its head), ``head`` (the vocab
        projection), ``encoder`` / ``decoder`` (an encoder-decoder model's halves), ``generate``.
        """
        self.pad_calls += 1
        self.forward_calls += kind != "head"  # a real continuation counts its base and head as one forward
        ids = torch.tensor([[self.prefix_token_id or 0]], device=self.device)
        if kind == "model":
            self.model(input_ids=ids, use_cache=False)
        elif kind == "base":
            self.model.base_model(input_ids=ids)
        elif kind == "head":
            head = self.model.get_output_embeddings()
            w = head.weight
            width = getattr(w, "ds_shape", w.shape)[-1]  # a ZeRO-3 weight's own tensor is an empty partition
            head(torch.zeros((1, width), dtype=w.dtype, device=self.device))
        elif kind == "encoder":
            self.model.get_encoder()(input_ids=ids)
        elif kind == "decoder":
            from transformers.modeling_outputs import BaseModelOutput

            width = (
                self.model.config.d_model if hasattr(self.model.config, "d_model") else self.model.config.hidden_size
            )
            enc = torch.zeros((1, 1, width), dtype=self.model.dtype, device=self.device)
            self.model(encoder_outputs=BaseModelOutput(last_hidden_state=enc), labels=ids, use_cache=False)
        elif kind == "generate":
            self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=1,
                do_sample=False,
                pad_token_id=self.pad_id,
                synced_gpus=True,
            )
        else:
            raise ValueError(f"unknown call kind {kind!r}")

    def _pad_step(self, need: Sequence[int], kinds: Sequence[str], done: Sequence[int] = ()) -> None:
        """Run the calls of ``need`` (per kind, in order) that this rank's batch did not (``done``)."""
        for k, (n, kind) in enumerate(zip(need, kinds)):
            for _ in range(n - (done[k] if k < len(done) else 0)):
                self._pad_call(kind)

    def _run_steps(self, batches: list, n: int, run, plan, kinds: Sequence[str]) -> None:
        """``run(batch, need)`` each batch; a sharded model's ranks run the same steps and calls in lock step.

        ``plan(batch)`` counts a batch's calls per kind; ``need`` is, per kind, the most any rank makes at
        this step (None when the ranks are independent). Steps past this rank's batches only pad.
        """
        if not self.lockstep:
            for b in batches:
                run(b, None)
            return
        needs = self._agree([plan(b) for b in batches], n, len(kinds))
        for s, need in enumerate(needs):
            if s < len(batches):
                run(batches[s], need)
            else:
                self._pad_step(need, kinds)

    def _gather(self, local: dict) -> dict:
        if self.world == 1:
            return local
        parts: list = [None] * self.world
        torch.distributed.all_gather_object(parts, local)
        out: dict = {}
        for p in parts:
            out.update(p)
        return out

    # ------------------------------------------------------------------ model calls
    def _forward(self, **kw):
        self.forward_calls += 1
        if not self.positions_ok:
            kw.pop("position_ids", None)
        return self.model(**kw)

    @staticmethod
    def _left_pad(seqs: list[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                ids[i, n - len(s) :] = torch.tensor(s, dtype=torch.long)
                mask[i, n - len(s) :] = 1
        return ids.to(device), mask.to(device)

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], progress: Optional[Callable[[int], None]] = None
    ) -> list[tuple[float, bool]]:
        """``(sum log p(continuation | context), continuation is the greedy decode)`` per request."""
        if self.seq2seq:
            return self._loglikelihood_seq2seq(requests, progress)
        cache: dict = {}
        groups: dict[tuple, list[tuple[tuple, int]]] = {}
        L = self.max_length
        for i, (ctx, cont) in enumerate(requests):
            c, k = self.encode_pair(ctx, cont, cache)
            if not k:
                raise DataError(
                    f"continuation {cont!r} encodes to no tokens",
                    where=f"request {i}",
                    fix="check the choices of this item (an empty choice cannot be scored)",
                )
            if len(k) > L:
                raise DataError(
                    f"continuation of {len(k)} tokens exceeds the model's max length {L}", where=f"request {i}"
                )
            if len(c) + len(k) > L + 1:  # lm-eval: keep the last L+1 tokens, i.e. truncate the context from the left
                c = (c + k)[-(L + 1) :][: -len(k)]
            groups.setdefault(tuple(c), []).append((tuple(k), i))
        keys = self._order(groups)
        mine = [keys[j] for j in self._mine(len(keys))]
        batches = [[(c, groups[c]) for c in b] for b in _chunks(mine, self.batch_size)]
        out: dict[int, tuple[float, bool]] = {}

        def run(batch, need):
            out.update(self._score_cached(batch, need) if self.cache_ok else self._score_plain(batch, need))
            if progress:
                progress(sum(len(conts) for _, conts in batch))

        if self.cache_ok:
            plan, kinds = self._plan_cached, ("model", "model", "model")
            if self.split_head:
                kinds = ("model", "model", "base", "head")
        else:
            plan, kinds = self._plan_plain, ("model",)
        with torch.inference_mode():
            self._run_steps(batches, len(keys), run, plan, kinds)
        out = self._gather(out)
        return [out[i] for i in range(len(requests))]

    PREFIX_KEY = 48  # contexts whose first tokens agree are batched together (few-shot prompts share them)
    MIN_SHARED = 16  # a shared prefix shorter than this is not worth a separate forward

    def _order(self, groups: dict) -> list[tuple]:
        """Longest first; contexts that share their first tokens (the few-shot prefix) kept together."""

        def size(c):
            return len(c) + max(len(k) for k, _ in groups[c])

        buckets: dict[tuple, list[tuple]] = {}
        for c in groups:
            buckets.setdefault(c[: self.PREFIX_KEY], []).append(c)
        shared = [sorted(b, key=lambda c: (-size(c), c)) for b in buckets.values() if len(b) > 1]
        single = sorted((b[0] for b in buckets.values() if len(b) == 1), key=lambda c: (-size(c), c))
        shared.sort(key=lambda b: (-size(b[0]), b[0]))
        return [c for b in shared for c in b] + single

    def _shared_prefix(self, ctxs: Sequence[Sequence[int]]) -> int:
        """Length of the first tokens all contexts share (0 if under ``MIN_SHARED``), leaving each one token."""
        p = 0
        if len(ctxs) > 1:
            shortest = min(len(c) for c in ctxs) - 1  # leave each row one token to produce its logits
            first = ctxs[0]
            while p < shortest and all(c[p] == first[p] for c in ctxs):
                p += 1
        return p if p >= self.MIN_SHARED else 0

    def _plan_cached(self, batch) -> list[int]:
        """Calls of :meth:`_score_cached` on ``batch``: shared-prefix forward, context forward, continuation
        forward (with a split head: its base model and its vocab projection)."""
        cont = int(any(len(k) > 1 for _, conts in batch for k, _ in conts))
        prefix = int(self._shared_prefix([c for c, _ in batch]) > 0)
        return [prefix, 1, cont] + ([cont] if self.split_head else [])

    def _plan_plain(self, batch) -> list[int]:
        """Forwards of :meth:`_score_plain` on ``batch``."""
        return [math.ceil(sum(len(conts) for _, conts in batch) / self.batch_size)]

    def _run_contexts(self, ctxs: list[list[int]], pad_prefix: bool = False):
        """Forward the contexts (left-padded) and return (last-position logits, cache, attention mask).

        When all contexts start with the same tokens, that prefix runs once and its cache is copied
        to every row; the rest of each context follows it after left padding (masked) with explicit
        positions, so every row still ends in the last column. ``pad_prefix``: when they share none,
        a throwaway call stands in for the prefix forward (other ranks run one at this step).
        """
        kw = {"logits_to_keep": 1} if self.keep_ok else {}
        p = self._shared_prefix(ctxs)
        if not p and pad_prefix:
            self._pad_call("model")
        if not p:
            ids, mask = self._left_pad(ctxs, self.pad_id, self.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self._forward(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
            return out.logits[:, -1, :], out.past_key_values, mask
        pre = torch.tensor([ctxs[0][:p]], dtype=torch.long, device=self.device)
        cache = self._forward(input_ids=pre, use_cache=True, **kw).past_key_values
        cache.batch_select_indices(torch.zeros(len(ctxs), dtype=torch.long, device=self.device))
        ids, rmask = self._left_pad([c[p:] for c in ctxs], self.pad_id, self.device)
        mask = torch.cat([torch.ones((len(ctxs), p), dtype=torch.long, device=self.device), rmask], dim=1)
        pos = p + (rmask.cumsum(-1) - 1).clamp(min=0)
        out = self._forward(
            input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True, **kw
        )
        return out.logits[:, -1, :], out.past_key_values, mask

    def _score_cached(self, batch: list[tuple[tuple, list[tuple[tuple, int]]]], need: Optional[list[int]] = None):
        """Run each context once, then all continuations of the batch on copies of its KV cache.

        ``need``: the calls per kind (:meth:`_plan_cached`) every rank makes at this step; the ones this
        batch lacks are padded.
        """
        ctxs = [list(c) for c, _ in batch]
        last, cache, mask = self._run_contexts(ctxs, pad_prefix=bool(need and need[0]))
        first = torch.log_softmax(last.float(), dim=-1)
        rows = []  # (group index, continuation, request index)
        for g, (_, conts) in enumerate(batch):
            rows += [(g, k, i) for k, i in conts]
        results = {}
        long_rows = [r for r in rows if len(r[1]) > 1]
        rest: dict[int, tuple[float, bool]] = {}
        if long_rows:
            rest = self._continue(cache, mask, [len(c) for c in ctxs], long_rows)
        elif need and need[2]:
            self._pad_step(need[2:], ("base", "head") if self.split_head else ("model",))
        best = first.argmax(-1).tolist()
        lp_first = first[torch.tensor([g for g, _, _ in rows]), torch.tensor([k[0] for _, k, _ in rows])].tolist()
        for (g, k, i), lp0 in zip(rows, lp_first):
            greedy0 = best[g] == k[0]
            lp, greedy = rest.get(i, (0.0, True))
            results[i] = (lp0 + lp, bool(greedy0 and greedy))
        return results

    def _continue(self, cache, ctx_mask, ctx_lens, rows) -> dict[int, tuple[float, bool]]:
        """Score continuation tokens 2.. of each row after its context's cached keys/values."""
        index = torch.tensor([g for g, _, _ in rows], device=self.device)
        cache.batch_select_indices(index)  # copies each context's cache once per continuation
        n = max(len(k) - 1 for _, k, _ in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        cmask = torch.zeros((len(rows), n), dtype=torch.long)
        for r, (_, k, _) in enumerate(rows):
            ids[r, : len(k) - 1] = torch.tensor(k[:-1])
            cmask[r, : len(k) - 1] = 1
        ids, cmask = ids.to(self.device), cmask.to(self.device)
        mask = torch.cat([ctx_mask[index], cmask], dim=1)
        start = torch.tensor([ctx_lens[g] for g, _, _ in rows], device=self.device)
        pos = start[:, None] + torch.arange(n, device=self.device)[None, :]
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        valid = cmask.bool()
        if self.split_head:  # the vocab projection only where a continuation token is predicted
            self.forward_calls += 1
            if not self.positions_ok:
                kw.pop("position_ids")
            hidden = self.model.base_model(**kw).last_hidden_state[valid]
            logits = self.model.get_output_embeddings()(hidden)
        else:
            logits = self._forward(**kw).logits[valid]
        logits = logits.float()  # [tokens, vocab], rows in order
        tgt = torch.tensor([t for _, k, _ in rows for t in k[1:]], device=self.device)
        # log p(t) = logit_t - logsumexp(logits): no [tokens, vocab] log-softmax tensor is written
        tok_lp = (logits.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)).tolist()
        hit = (logits.argmax(-1) == tgt).tolist()
        res, at = {}, 0
        for _, k, i in rows:
            m = len(k) - 1
            res[i] = (math.fsum(tok_lp[at : at + m]), all(hit[at : at + m]))
            at += m
        return res

    def _score_plain(self, batch, need: Optional[list[int]] = None):
        """lm-eval's scheme: one right-padded sequence per request, for models without a KV cache API."""
        rows = [(c, k, i) for c, conts in batch for k, i in conts]
        results = {}
        if need:
            self._pad_step(need, ("model",), self._plan_plain(batch))
        for part in _chunks(rows, self.batch_size):
            seqs = [list(c + k)[:-1] for c, k, _ in part]
            n = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s)
            logits = self._forward(input_ids=ids.to(self.device)).logits
            for r, (c, k, i) in enumerate(part):
                lp = torch.log_softmax(logits[r, len(c) - 1 : len(c) - 1 + len(k)].float(), dim=-1)
                tgt = torch.tensor(k, device=self.device)
                results[i] = (float(lp.gather(1, tgt[:, None]).sum()), bool((lp.argmax(-1) == tgt).all()))
        return results

    # ------------------------------------------------------------------ encoder-decoder models
    def encode_pair_seq2seq(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Encoder and decoder tokens of a request, as lm-eval's seq2seq backend makes them.

        Trailing context spaces move to the continuation; each side is encoded on its own with the
        tokenizer's special tokens (T5 ends both with ``</s>``) and keeps its last ``max_length`` tokens.
        """
        L = self.max_length
        if context == "":
            return [self.prefix_token_id], self.tok.encode(continuation)[-L:]
        n = len(context) - len(context.rstrip())
        if n:
            continuation, context = context[-n:] + continuation, context[:-n]
        return self.tok.encode(context)[-L:], self.tok.encode(continuation)[-L:]

    def _encode(self, ctxs: list[Sequence[int]]):
        """The encoder's output over the contexts (right-padded), and their attention mask."""
        ids = torch.full((len(ctxs), max(len(c) for c in ctxs)), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, c in enumerate(ctxs):
            ids[r, : len(c)] = torch.tensor(list(c), dtype=torch.long)
            mask[r, : len(c)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.forward_calls += 1
        return self.model.get_encoder()(input_ids=ids, attention_mask=mask), mask

    def _decode_logits(self, enc, enc_mask, index: torch.Tensor, targets: list[Sequence[int]]) -> torch.Tensor:
        """Decoder logits [rows, longest target, vocab] with row ``r`` reading encoder row ``index[r]``.

        The targets go in as ``labels`` (right-padded with -100), so the model builds its own decoder
        inputs (start token, then the target shifted right) exactly as in training.
        """
        from transformers.modeling_outputs import BaseModelOutput

        labels = torch.full((len(targets), max(len(t) for t in targets)), -100, dtype=torch.long)
        for r, t in enumerate(targets):
            labels[r, : len(t)] = torch.tensor(list(t), dtype=torch.long)
        self.forward_calls += 1
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=enc.last_hidden_state[index]),
            attention_mask=enc_mask[index],
            labels=labels.to(self.device),
            use_cache=False,
        )
        return out.logits

    def _loglikelihood_seq2seq(
        self, requests: Sequence[tuple[str, str]], progress: Optional[Callable[[int], None]] = None
    ) -> list[tuple[float, bool]]:
        """:meth:`loglikelihood` of an encoder-decoder model: each distinct context is encoded once."""
        groups: dict[tuple, list[tuple[tuple, int]]] = {}
        for i, (ctx, cont) in enumerate(requests):
            c, k = self.encode_pair_seq2seq(ctx, cont)
            if not k:
                raise DataError(
                    f"continuation {cont!r} encodes to no tokens",
                    where=f"request {i}",
                    fix="check the choices of this item (an empty choice cannot be scored)",
                )
            groups.setdefault(tuple(c), []).append((tuple(k), i))
        keys = sorted(groups, key=lambda c: (-len(c), c))
        mine = [keys[j] for j in self._mine(len(keys))]
        out: dict[int, tuple[float, bool]] = {}
        per_call = self.batch_size * 4  # continuations per decoder call

        def plan(batch):
            return [1, math.ceil(sum(len(groups[c]) for c in batch) / per_call)]

        def run(batch, need):
            enc, enc_mask = self._encode(batch)
            rows = [(g, k, i) for g, c in enumerate(batch) for k, i in groups[c]]
            for part in _chunks(rows, per_call):
                index = torch.tensor([g for g, _, _ in part], device=self.device)
                logits = self._decode_logits(enc, enc_mask, index, [k for _, k, _ in part])
                for r, (_, k, i) in enumerate(part):
                    lp = torch.log_softmax(logits[r, : len(k)].float(), dim=-1)
                    tgt = torch.tensor(k, device=self.device)
                    out[i] = (
                        math.fsum(lp.gather(1, tgt[:, None]).squeeze(1).tolist()),
                        bool((lp.argmax(-1) == tgt).all()),
                    )
            if need:  # the decoder calls other ranks make at this step beyond this batch's
                self._pad_step(need, ("encoder", "decoder"), plan(batch))
            if progress:
                progress(len(rows))

        with torch.inference_mode():
            self._run_steps(list(_chunks(mine, self.batch_size)), len(keys), run, plan, ("encoder", "decoder"))
        out = self._gather(out)
        return [out[i] for i in range(len(requests))]

    def _first_decoder_logprobs(self, contexts: Sequence[Sequence[int]], tid: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of ``tid`` at the first decoder position after each encoded context."""
        enc, enc_mask = self._encode(list(contexts))
        index = torch.arange(len(contexts), device=self.device)
        logits = self._decode_logits(enc, enc_mask, index, [[0]] * len(contexts))
        return torch.log_softmax(logits[:, 0, :].float(), dim=-1)[:, tid]

    # ------------------------------------------------------------------ "Answer: X" letter mode
    def next_token_logprobs(self, contexts: Sequence[str], token_ids: Sequence[int]) -> list[list[float]]:
        """Log-probabilities of ``token_ids`` as the next token after each context (hendrycks MMLU mode)."""
        L = self.max_length
        enc = [self.tok_encode(c)[-L:] for c in contexts]
        order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
        mine = [order[j] for j in self._mine(len(order))]
        tid = torch.tensor(list(token_ids), device=self.device)
        out = {}
        kinds = ("encoder", "decoder") if self.seq2seq else ("model",)

        def run(part, need):
            if self.seq2seq:
                lp = self._first_decoder_logprobs([enc[i] for i in part], tid)
            else:
                ids, mask = self._left_pad([enc[i] for i in part], self.pad_id, self.device)
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                kw = {"logits_to_keep": 1} if self.keep_ok else {}
                logits = self._forward(
                    input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kw
                ).logits
                lp = torch.log_softmax(logits[:, -1, :].float(), dim=-1)[:, tid]
            for r, i in enumerate(part):
                out[i] = lp[r].tolist()

        with torch.inference_mode():
            self._run_steps(list(_chunks(mine, self.batch_size)), len(order), run, lambda b: [1] * len(kinds), kinds)
        out = self._gather(out)
        return [out[i] for i in range(len(contexts))]

    # ------------------------------------------------------------------ generation
    def generate_until(
        self,
        contexts: Sequence[str],
        until: Sequence[str],
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        num_samples: int = 1,
        seed: int = 0,
        progress: Optional[Callable[[int], None]] = None,
    ) -> list[list[str]]:
        """Continuations of each context, cut before the stop strings (``num_samples`` per context).

        Decoded by :class:`minima.infer.engine.Engine` in batches of ``batch_size`` contexts (their
        samples count too); greedy unless ``do_sample``. Sampled context ``i`` is seeded with
        ``seed + i``, so its samples do not depend on the batch or the rank that decodes it.
        """
        import queue

        from minima.infer.engine import Engine, SamplingParams

        # lm-eval: leave room for the generation (a decoder-only model's context holds both)
        keep = self.max_length if self.seq2seq else max(1, self.max_length - max_new_tokens)
        enc = [self.tok_encode(c)[-keep:] or [self.prefix_token_id] for c in contexts]
        order = sorted(range(len(enc)), key=lambda i: (-len(enc[i]), i))
        mine = [order[j] for j in self._mine(len(order))]
        if self.synced_gpus:
            out = self._generate_synced(
                enc, mine, len(order), until, max_new_tokens, do_sample, temperature, num_samples, seed, progress
            )
            out = self._gather(out)
            return [out[i] for i in range(len(contexts))]
        stops = tuple(s for s in until if s)
        engine = Engine(
            self.model, self.tok, max_batch_size=self.batch_size * num_samples, context_length=self.max_length
        )
        finished: queue.Queue = queue.Queue()
        reqs = {}
        for i in mine:
            params = SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=temperature if do_sample else 0.0,
                n=num_samples,
                seed=seed + i,
                stop=stops,
            )
            reqs[i] = engine.submit(enc[i], params, on_done=finished.put)  # a context's samples are all done
        try:
            for _ in reqs:
                finished.get()
                if progress:
                    progress(1)
            out = {i: [c.text for c in r.result()] for i, r in reqs.items()}
        finally:
            for r in reqs.values():
                r.cancel()
            engine.close()
            self.forward_calls += engine.stats["forward_calls"]
        out = self._gather(out)
        return [out[i] for i in range(len(contexts))]

    def _generate_synced(
        self, enc, mine, n, until, max_new_tokens, do_sample, temperature, num_samples, seed, progress
    ) -> dict[int, list[str]]:
        """HF ``generate`` with ``synced_gpus``, for a model sharded over the ranks (ZeRO-3, FSDP): every rank
        keeps stepping until all are done, which the engine's independent batches cannot promise.

        With the requests split (``distributed``), every rank makes as many ``generate`` calls as the rank
        with the most batches; the extra ones decode one token from one token and are thrown away.
        """
        from transformers import StoppingCriteria, StoppingCriteriaList

        tok = self.tok
        stops = [s for s in until if s]

        class _Stop(StoppingCriteria):
            def __init__(self, start: int, rows: int):
                self.start, self.done = start, torch.zeros(rows, dtype=torch.bool)

            def __call__(self, input_ids, scores, **kw):
                for r in range(input_ids.shape[0]):
                    if not self.done[r]:
                        text = tok.decode(input_ids[r, self.start :], skip_special_tokens=True)
                        self.done[r] = any(s in text for s in stops)
                return self.done.clone().to(input_ids.device)

        out: dict[int, list[str]] = {}
        if do_sample:
            torch.manual_seed(seed)

        def run(part, need):
            ids, mask = self._left_pad([enc[i] for i in part], self.pad_id, self.device)
            start = 1 if self.seq2seq else ids.shape[1]  # seq2seq output: decoder start, then new tokens
            crit = _Stop(start, len(part) * num_samples)
            kw = (
                dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
                if do_sample
                else dict(do_sample=False)
            )
            if self.synced_gpus:  # ranks stop at different steps; each keeps stepping until all are done
                kw["synced_gpus"] = True
            gen = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                stopping_criteria=StoppingCriteriaList([crit]),
                pad_token_id=self.pad_id,
                **kw,
            )
            self.forward_calls += 1
            for r, i in enumerate(part):
                texts = []
                for s in range(num_samples):
                    text = tok.decode(gen[r * num_samples + s, start:], skip_special_tokens=True)
                    for stop in stops:
                        if stop in text:
                            text = text.split(stop)[0]
                    texts.append(text)
                out[i] = texts
            if progress:
                progress(len(part))

        with torch.inference_mode():
            self._run_steps(list(_chunks(mine, self.batch_size)), n, run, lambda b: [1], ("generate",))
        return out

    # ------------------------------------------------------------------ perplexity
    def _window_nll(self, ids: torch.Tensor, part: list[tuple], toks: list[torch.Tensor], need=None) -> list[float]:
        """Summed NLL of each window's scored tokens, one row of logits at a time, in vocab chunks.

        No [batch, window, vocab] fp32 log-softmax (65 GB at 32 x 4096 x 49216): with a split head only
        one row's logits exist at once, and the loss reads them ``SCORE_CHUNK`` columns at a time.

        Args:
            ids: the windows' tokens, right-padded. part: per row ``(doc, begin, end, first scored)``.
            toks: every document's tokens. need: the calls per kind every rank makes at this step
                (:meth:`_plan_windows`); this rank pads the vocab projections its batch lacks.
        """
        from minima.train.objectives.kd import dense_loss

        if self.split_head:
            self.forward_calls += 1
            hidden = self.model.base_model(input_ids=ids).last_hidden_state
            head = self.model.get_output_embeddings()

            def row_logits(r, a, z):
                return head(hidden[r, a:z])
        else:
            logits = self._forward(input_ids=ids).logits

            def row_logits(r, a, z):
                return logits[r, a:z]

        out = []
        for r, (d, b, e, s) in enumerate(part):
            tgt = toks[d][s:e].to(ids.device)
            ce, _ = dense_loss(row_logits(r, s - b - 1, e - b - 1), tgt, None, chunk=SCORE_CHUNK)
            out.append(float(ce.double().sum()))
        if need:
            self._pad_step(need, self._window_kinds(), self._plan_windows(part))
        return out

    def _plan_windows(self, part) -> list[int]:
        """Calls of :meth:`_window_nll` on ``part``: one forward (with a split head: and a projection per row)."""
        return [1, len(part)] if self.split_head else [1]

    def _window_kinds(self) -> tuple[str, ...]:
        return ("base", "head") if self.split_head else ("model",)

    def _spans(self, n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
        """``(begin, end, first scored position)`` of the windows over ``n`` tokens."""
        spans = []
        prev_end, begin = 0, 0
        while True:
            end = min(begin + window, n)
            spans.append((begin, end, max(prev_end, begin + 1)))
            prev_end = end
            if end >= n:
                break
            begin += stride
        return spans

    def rolling_nll(
        self, tokens: Sequence[int], window: Optional[int] = None, stride: Optional[int] = None
    ) -> tuple[float, int]:
        """Summed negative log-likelihood and token count of ``tokens[1:]`` with a sliding window.

        Each window of ``window`` tokens scores only the tokens the previous window did not (the Hugging
        Face perplexity recipe); ``stride`` is how far it advances, so every scored token sees at least
        ``window - stride`` tokens of context. The stride is capped at ``window - 1`` so that the first
        token of a window is context, never an unconditioned prediction.
        """
        return self.rolling_nll_many([tokens], window=window, stride=stride)[0]

    def rolling_nll_many(
        self, docs: Sequence[Sequence[int]], window: Optional[int] = None, stride: Optional[int] = None
    ) -> list[tuple[float, int]]:
        """:meth:`rolling_nll` of each document; the windows of all of them are batched (and split over ranks).

        A document's windows are summed in order, so its result does not depend on how they were batched.
        """
        if self.seq2seq:
            raise InputError(
                "rolling perplexity scores a text token by token after its own prefix: it needs a decoder-only model",
                fix="evaluate perplexity tasks with a causal LM, or drop them for this encoder-decoder model",
            )
        window = min(int(window or self.max_length), self.max_length)
        if window < 2:
            raise InputError(f"perplexity window {window} is too small", fix="use max_length >= 2")
        stride = int(stride or max(1, window // 2))
        if stride > window:
            raise InputError(f"stride {stride} is larger than the window {window}", fix="use stride <= max_length")
        stride = min(stride, window - 1)
        toks = [torch.tensor(list(t), dtype=torch.long) for t in docs]
        wins = [(d, *sp) for d, t in enumerate(toks) for sp in self._spans(len(t), window, stride)]
        order = sorted(range(len(wins)), key=lambda w: (-(wins[w][2] - wins[w][1]), w))  # longest first
        mine = [order[j] for j in self._mine(len(order))]
        nll: dict[int, float] = {}

        def run(ws, need):
            part = [wins[w] for w in ws]
            ids = torch.full((len(part), max(e - b for _, b, e, _ in part)), self.pad_id, dtype=torch.long)
            for r, (d, b, e, _) in enumerate(part):
                ids[r, : e - b] = toks[d][b:e]
            nll.update(zip(ws, self._window_nll(ids.to(self.device), part, toks, need)))

        with torch.inference_mode():
            self._run_steps(
                list(_chunks(mine, self.batch_size)), len(wins), run, self._plan_windows, self._window_kinds()
            )
        nll = self._gather(nll)
        out = [(0.0, 0) for _ in docs]
        for w, (d, _, e, s) in enumerate(wins):  # in window order within each document
            total, count = out[d]
            out[d] = (total + nll[w], count + e - s)
        return out
