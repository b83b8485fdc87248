"""The text-generation engine: one batched decoding loop over a Hugging Face causal LM.

``minima serve``, ``minima chat``, the judge's local answers, chat benchmarks and the generative
evaluation tasks (gsm8k, bbh, drop, humaneval) all generate through :class:`Engine`.

Requests (prompt token ids plus :class:`SamplingParams`) wait in a queue. One scheduler thread owns
the model and decodes every running sequence together:

- queued requests are prefilled as one left-padded batch (explicit position ids) and join the
  running batch at the next step, up to ``max_batch_size`` sequences; their KV caches are padded on
  the left to a common length and concatenated;
- a sequence that finishes leaves the batch at once (its result is delivered), so a long request
  never holds up short ones and new requests take the freed rows;
- the ``n`` choices of a request share one prefill and then decode as separate rows.

Every choice samples with its own ``torch.Generator``, seeded from the request's seed and the choice
index, and draws from it once per step: a seeded request gives the same tokens whatever else is in
the batch (up to the floating-point differences of batched matrix products). Temperature 0 is greedy
and equals ``model.generate(do_sample=False)`` run prompt by prompt.

A sequence ends at an end-of-sequence token (or another stop token id; neither is part of the text),
at ``max_new_tokens``, at the model's context length, or when its text contains a stop string; the
text is then cut before the stop strings the way lm-eval's ``generate_until`` cuts it
(``text.split(s)[0]`` for each stop string in order). Streamed deltas hold back any tail that may
still become a stop string, so joined they always equal the final text.

Encoder-decoder (seq2seq) models such as T5 run the same loop: the prompt goes to the encoder once
(its output and mask stay with the batch, row for row), and the decoder starts from the model's
decoder start token. Their rows all start decoding at the same step, so a running seq2seq batch
takes no new rows (the next prefill waits until it has finished).
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import queue
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from minima.core.errors import InputError, MinimaError
from minima.core.logs import get_logger

log = get_logger("minima.infer.engine")

FINISH_REASONS = ("stop", "length", "cancelled")
_SEED_MIX = 0x9E3779B97F4A7C15  # spreads the seeds of a request's choices apart


class QueueFull(MinimaError):
    """The engine's request queue is full; retry later."""


# ------------------------------------------------------------------------------------ requests
@dataclass(frozen=True)
class SamplingParams:
    """How to decode one request.

    Args:
        max_new_tokens: most tokens to generate per choice.
        temperature: 0 decodes greedily; above 0 samples from ``softmax(logits / temperature)``.
        top_p: nucleus sampling: keep the most likely tokens until their mass reaches ``top_p`` (the
            most likely token always stays). Ignored when greedy.
        n: choices (independent sequences) per prompt.
        seed: seed of choice 0 (choice ``i`` derives its own); None draws a random one.
        stop: stop strings; the text is cut before them.
        stop_token_ids: token ids that end a sequence besides the end-of-sequence ids of the model's
            generation config and of the tokenizer.
        ignore_eos: keep decoding past end-of-sequence tokens (fixed-length outputs for benchmarks).
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1; got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1]; got {self.top_p}")
        if self.n < 1:
            raise InputError(f"n must be at least 1; got {self.n}")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass
class Completion:
    """One finished choice: its text, the generated token ids (stop tokens excluded) and why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass
class Event:
    """One decoding step of one choice: the new text (may be empty while held back) and, at the end, why.

    ``token_id`` is the token sampled at this step (an end-of-sequence token included); None when
    the request was cancelled.
    """

    index: int
    text: str
    token_id: Optional[int]
    finish_reason: Optional[str] = None


class Request:
    """A submitted generation. ``result()`` waits for it; ``cancel()`` ends it at the next step.

    Both callbacks run in the engine's thread. ``on_event`` gets every :class:`Event` of every
    choice, then ``None`` once the request is complete or has failed (``error`` is set then);
    ``on_done`` gets the request once, at that same moment. Without ``on_event`` and stop strings
    the text is decoded once, at the end.
    """

    def __init__(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        on_event: Optional[Callable[[Optional[Event]], None]] = None,
        on_done: Optional[Callable[[Request], None]] = None,
    ):
        self.prompt = [int(t) for t in prompt]
        self.params = params
        self.on_event = on_event
        self.on_done = on_done
        self.outputs: list[Optional[Completion]] = [None] * params.n
        self.error: Optional[BaseException] = None
        self.cancelled = False
        self._left = params.n
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        """Whether every choice has finished (or the request failed)."""
        return self._done.is_set()

    @property
    def completion_tokens(self) -> int:
        """Tokens generated over all finished choices."""
        return sum(len(c.token_ids) for c in self.outputs if c is not None)

    def cancel(self) -> None:
        """Stop decoding this request at the next step (its choices end with ``cancelled``)."""
        self.cancelled = True

    def result(self, timeout: Optional[float] = None) -> list[Completion]:
        """The ``n`` completions, once all have finished; re-raises the engine's error if it failed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"generation not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        return list(self.outputs)  # type: ignore[arg-type]

    # --- called by the engine's thread ----------------------------------------------------------
    def _emit(self, event: Optional[Event]) -> None:
        try:
            if self.on_event is not None:
                self.on_event(event)
            if event is None and self.on_done is not None:
                self.on_done(self)
        except Exception:  # a broken listener must not stop the other requests
            log.exception("a generation listener failed; cancelling its request")
            self.cancelled = True

    def _finish_choice(self, index: int, completion: Completion) -> None:
        self.outputs[index] = completion
        self._left -= 1
        if self._left == 0:
            self._done.set()
            self._emit(None)

    def _fail(self, error: BaseException) -> None:
        if self._done.is_set():
            return
        self.error = error
        self._done.set()
        self._emit(None)


class _Choice:
    """Incremental detokenization of one sequence, with stop strings held back until decided.

    With ``incremental=False`` (no stop strings, nobody streaming) tokens are only collected and
    the text is decoded once, when the sequence finishes.
    """

    def __init__(self, tok: Any, stop: tuple[str, ...], incremental: bool = True):
        self.tok, self.stop, self.incremental = tok, stop, incremental or bool(stop)
        self.byte_ids = byte_token_ids(tok) if self.incremental else frozenset()
        self.ids: list[int] = []
        self.text = ""  # text settled so far (cut at the stop strings once one appears)
        self.sent = ""  # what has been handed out as deltas
        self.finish_reason: Optional[str] = None

    def push(self, token_id: int) -> str:
        """Add a generated token; the new text that is safe to hand out (may be empty)."""
        self.ids.append(token_id)
        if not self.incremental:
            return ""
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if any(s in text for s in self.stop):
            self.text = cut_at_stop(text, self.stop)
            return self.finish("stop")
        self.text = text
        # A trailing run of byte-fallback tokens may still become another character (its bytes decode
        # together), and an incomplete UTF-8 sequence is not text yet: neither is handed out.
        settled = len(self.ids)
        while settled and self.ids[settled - 1] in self.byte_ids:
            settled -= 1
        if settled < len(self.ids):
            text = self.tok.decode(self.ids[:settled], skip_special_tokens=True)
        safe = text.rstrip("\ufffd")
        hold = max((k for s in self.stop for k in range(1, len(s)) if safe.endswith(s[:k])), default=0)
        return self._flush(safe[: len(safe) - hold])

    def finish(self, reason: str) -> str:
        """End the sequence; the rest of its text."""
        self.finish_reason = reason
        if not self.incremental:
            self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        return self._flush(self.text)

    def _flush(self, upto: str) -> str:
        # Deltas only ever extend what was sent; joined they are the reply text.
        if len(upto) > len(self.sent) and upto.startswith(self.sent):
            delta, self.sent = upto[len(self.sent) :], upto
            return delta
        return ""


def byte_token_ids(tok: Any) -> frozenset[int]:
    """Ids of the tokenizer's byte-fallback pieces (``<0x00>`` .. ``<0xFF>``), cached on the tokenizer."""
    ids = getattr(tok, "_minima_byte_ids", None)
    if ids is None:
        vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
        ids = frozenset(
            i for piece, i in vocab.items() if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
        )
        with contextlib.suppress(AttributeError):  # a tokenizer that takes no attributes: computed each time
            tok._minima_byte_ids = ids
    return ids


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` cut before its stop strings, as lm-eval's ``generate_until`` does (each in order)."""
    for s in stop:
        if s:
            text = text.split(s)[0]
    return text


class _Seq:
    """One running choice: its request, sampler state, detokenizer and next position."""

    __slots__ = ("req", "index", "gen", "choice", "pos", "pending", "temperature", "top_p", "stop_ids")

    def __init__(self, req: Request, index: int, gen, choice: _Choice, pos: int, stop_ids: frozenset):
        self.req, self.index, self.gen, self.choice, self.pos = req, index, gen, choice, pos
        self.pending = -1  # the last sampled token, fed at the next step
        self.temperature, self.top_p = req.params.temperature, req.params.top_p
        self.stop_ids = stop_ids


@dataclass
class _Batch:
    """The running sequences: one row each in the KV cache and the attention mask."""

    rows: list = field(default_factory=list)
    cache: Any = None
    mask: Any = None  # [rows, cached length] 1 where a row has a real token
    encoded: Any = None  # seq2seq: the encoder's output [rows, prompt length, hidden]
    encoded_mask: Any = None  # seq2seq: its attention mask [rows, prompt length]


# -------------------------------------------------------------------------------------- engine
def load_model_dir(
    path: Union[str, Path], device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """A model directory's LM (causal or encoder-decoder, eval mode) and tokenizer, on ``device`` in ``dtype``.

    Args:
        path: Hugging Face model directory.
        device: cuda, cpu or auto (cuda when available).
        dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32.
        trust_remote_code: allow model code from the checkpoint.
    """
    from minima.models.loader import load_config, load_model, load_tokenizer, resolve_device

    p = Path(path)
    if not (p / "config.json").is_file():
        raise InputError(
            f"no model at {p} (config.json missing)", fix="pass model=DIR of a Hugging Face model directory"
        )
    load_config(p, trust_remote_code=trust_remote_code)
    dev = resolve_device(device)
    tok = load_tokenizer(p, trust_remote_code=trust_remote_code)
    model = load_model(p, dtype=dtype, device=dev, trust_remote_code=trust_remote_code)
    return model, tok


class Engine:
    """Batched generation with a KV cache over a causal or encoder-decoder LM and its tokenizer.

    Args:
        model: a Hugging Face ``*ForCausalLM`` or ``*ForConditionalGeneration`` (put in eval mode).
        tokenizer: its tokenizer.
        max_batch_size: most sequences decoded together (a request's ``n`` choices count each).
        max_queue: most requests waiting to start; beyond it :meth:`submit` raises :class:`QueueFull`
            (None: no limit).
        chat_format: a ``minima.data.formats`` registry format for chats (None: the tokenizer's chat
            template, else minichat).
        context_length: the context window (default: from the model config).
    """

    IDLE_EXIT_S = 2.0  # the scheduler thread ends after this long without work (a new request restarts it)

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 8,
        max_queue: Optional[int] = None,
        chat_format: Optional[str] = None,
        context_length: Optional[int] = None,
    ):
        self.model = model.eval()
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self.tok = tokenizer
        self.device = next(model.parameters()).device
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_queue = max_queue
        self.context_length = int(context_length or self._context_length())
        self.eos_ids = self._eos_ids()
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        params = inspect.signature(model.forward).parameters
        self._with_positions = "position_ids" in params and not self.seq2seq
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        # Whether running batches accept new rows (known after a prefill); seq2seq rows start together.
        self._joinable: Optional[bool] = False if self.seq2seq else None
        self.chat_format = chat_format
        self._format: Any = None
        self._cond = threading.Condition()
        self._queue: collections.deque[Request] = collections.deque()
        self._thread: Optional[threading.Thread] = None
        self._batch = _Batch()  # the running sequences (owned by the scheduler thread)
        self._running = 0  # requests in the running batch
        embeddings = model.get_input_embeddings()
        self.vocab_size = int(getattr(embeddings, "num_embeddings", 0) or model.config.vocab_size)
        self.stats = {"forward_calls": 0, "decode_steps": 0, "batched_steps": 0, "peak_batch": 0, "requests": 0}

    @classmethod
    def from_dir(
        cls,
        path: Union[str, Path],
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        **kw,
    ) -> Engine:
        """An engine over the model directory ``path`` (see :func:`load_model_dir`; ``kw`` go to the engine)."""
        model, tok = load_model_dir(path, device, dtype, trust_remote_code)
        return cls(model, tok, **kw)

    def _context_length(self) -> int:
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        value = getattr(self.tok, "model_max_length", 0)
        return value if 0 < value < 1_000_000 else 2048

    def _eos_ids(self) -> frozenset:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for value in (getattr(gen, "eos_token_id", None), self.tok.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    # --- prompts ------------------------------------------------------------------------------
    @property
    def format(self):
        """The registry format chats are rendered with, or None when the tokenizer's chat template is used."""
        if self._format is None and (self.chat_format or not getattr(self.tok, "chat_template", None)):
            from minima.data.formats import get_format

            name = self.chat_format or "minichat"
            if not self.chat_format:
                log.warning("the tokenizer has no chat template; rendering chats with the '%s' format", name)
            self._format = get_format(name)
        return self._format

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Prompt ids of a conversation plus the assistant prefix (ValueError on a bad conversation)."""
        fmt = self.format
        if fmt is not None:
            return fmt.encode(self.tok, messages, add_generation_prompt=True)[0]
        from jinja2 import TemplateError

        try:
            text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as e:
            raise ValueError(f"the chat template rejected the messages: {e}") from None
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def text_ids(self, text: str) -> list[int]:
        """Prompt ids of a plain completion prompt (with BOS as the tokenizer adds it)."""
        return list(self.tok(text)["input_ids"])

    # --- public API ---------------------------------------------------------------------------
    def submit(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        on_event: Optional[Callable[[Optional[Event]], None]] = None,
        on_done: Optional[Callable[[Request], None]] = None,
    ) -> Request:
        """Queue a prompt (token ids); it joins the running batch at the next step with room.

        ``on_event`` and ``on_done`` are called in the engine's thread (see :class:`Request`).

        Raises:
            InputError: the prompt is empty or does not leave room for one new token.
            QueueFull: ``max_queue`` requests are already waiting.
        """
        req = Request(prompt, params, on_event, on_done)
        if not req.prompt:
            raise InputError("the prompt has no tokens", fix="pass at least one token (e.g. BOS)")
        if not 0 <= min(req.prompt) <= max(req.prompt) < self.vocab_size:
            raise InputError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(req.prompt) >= self.context_length:
            raise InputError(
                f"a prompt of {len(req.prompt)} tokens leaves no room in the context of {self.context_length}",
                fix="shorten the prompt",
            )
        with self._cond:
            if self.max_queue is not None and len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are already waiting", fix="retry later")
            self._queue.append(req)
            self.stats["requests"] += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="minima-engine", daemon=True)
                self._thread.start()
            self._cond.notify()
        return req

    def generate(
        self, prompts: Sequence[Sequence[int]], params: Union[SamplingParams, Sequence[SamplingParams]]
    ) -> list[list[Completion]]:
        """Completions of every prompt (``n`` each), decoded together; blocks until all are done."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        reqs: list[Request] = []
        try:
            for p, sp in zip(prompts, plist):
                reqs.append(self.submit(p, sp))
            return [r.result() for r in reqs]
        finally:
            for r in reqs:
                r.cancel()

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[Event]:
        """The events of one request as they are decoded (closing the iterator cancels it)."""
        events: queue.Queue = queue.Queue()
        req = self.submit(prompt, params, on_event=events.put)
        try:
            while (event := events.get()) is not None:
                yield event
            if req.error is not None:
                raise req.error
        finally:
            req.cancel()

    def chat(
        self,
        messages: list[dict],
        max_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: Optional[int] = 0,
        stop: Sequence[str] = (),
    ) -> str:
        """One reply to a conversation, in process; safe to call from several threads (they batch).

        A conversation too long for the context loses its oldest tokens, keeping room for
        ``min(max_tokens, context / 4)`` new ones; the reply is cut at the context's end.
        """
        prompt = self.chat_ids(messages)
        reserve = max(1, min(max_tokens, self.context_length // 4))
        if len(prompt) + reserve > self.context_length:
            log.warning(
                "a conversation of %d tokens does not fit the context of %d: keeping its last %d tokens",
                len(prompt),
                self.context_length,
                self.context_length - reserve,
            )
            prompt = prompt[len(prompt) + reserve - self.context_length :]
        room = self.context_length - len(prompt)
        p = SamplingParams(
            max_new_tokens=min(max_tokens, room), temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stop)
        )
        return self.submit(prompt, p).result()[0].text

    def queued(self) -> int:
        """Requests waiting to start."""
        return len(self._queue)

    def running(self) -> int:
        """Requests in the running batch."""
        return self._running

    def close(self) -> None:
        """Cancel every queued and running request (the scheduler thread then ends)."""
        with self._cond:
            waiting = list(self._queue)
            self._queue.clear()
        for r in waiting:
            r.cancel()
            r._fail(MinimaError("the generation engine was closed"))
        for s in list(self._batch.rows):
            s.req.cancel()  # its choices end with "cancelled" at the next step

    # --- scheduler ----------------------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        batch = self._batch
        with torch.inference_mode():
            while True:
                with self._cond:
                    if not batch.rows and not self._queue:
                        self._cond.wait(self.IDLE_EXIT_S)
                        if not self._queue:
                            self._thread = None
                            return
                    new = self._admit(batch)
                try:
                    if new:
                        self._prefill(batch, new)
                    if batch.rows:
                        self._decode(batch)
                except Exception as e:  # fail what was running; the engine goes on with the next requests
                    log.exception("generation failed")
                    failed = {id(s.req): s.req for s in batch.rows}
                    failed.update((id(r), r) for r in new)
                    for r in failed.values():
                        r._fail(e)
                    batch.rows, batch.cache, batch.mask = [], None, None
                    batch.encoded = batch.encoded_mask = None
                self._running = len({id(s.req) for s in batch.rows})

    def _admit(self, batch: _Batch) -> list[Request]:
        """Queued requests that fit the batch now, first come first served (called under the lock)."""
        rows = len(batch.rows)
        if rows and self._joinable is False:
            return []
        out: list[Request] = []
        while self._queue:
            req = self._queue[0]
            if req.cancelled:
                self._queue.popleft()
                req._fail(MinimaError("the request was cancelled before it started"))
                continue
            if rows and rows + req.params.n > self.max_batch_size:
                break
            out.append(self._queue.popleft())
            rows += req.params.n
        return out

    def _forward(self, ids, mask, positions, cache):
        self.stats["forward_calls"] += 1
        if self.seq2seq:
            return self._forward_decoder(ids, cache)
        kw = dict(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, **self._keep)
        if self._with_positions:
            kw["position_ids"] = positions
        out = self.model(**kw)
        return out.logits[:, -1, :], out.past_key_values

    def _forward_decoder(self, ids, cache):
        """One decoder step of a seq2seq batch over its stored encoder output."""
        from transformers.modeling_outputs import BaseModelOutput

        batch = self._batch
        out = self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=batch.encoded),
            attention_mask=batch.encoded_mask,
            decoder_input_ids=ids,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1, :], out.past_key_values

    def _decoder_start(self) -> int:
        cfg = self.model.config
        for v in (getattr(self.model.generation_config, "decoder_start_token_id", None), cfg.decoder_start_token_id):
            if isinstance(v, int):
                return v
        return self.pad_id

    def _prefill(self, batch: _Batch, reqs: list[Request]) -> None:
        """Run the new prompts (left-padded), sample their first tokens and add their rows to the batch."""
        import torch

        width = max(len(r.prompt) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt, dtype=torch.long)
            mask[i, width - len(r.prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        if self.seq2seq:  # the batch is empty (seq2seq batches take no new rows): it holds these prompts
            self.stats["forward_calls"] += 1
            batch.encoded = self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            batch.encoded_mask = mask
            start = torch.full((len(reqs), 1), self._decoder_start(), dtype=torch.long, device=self.device)
            logits, cache = self._forward(start, None, None, None)
            mask = torch.ones_like(start)
        else:
            logits, cache = self._forward(ids, mask, positions, None)
        if self._joinable is None:
            self._joinable = _mergeable(cache)
        rows = []
        for r in reqs:
            seed = r.params.seed if r.params.seed is not None else secrets.randbits(63)
            stop_ids = frozenset(r.params.stop_token_ids) | (frozenset() if r.params.ignore_eos else self.eos_ids)
            for k in range(r.params.n):
                gen = None
                if r.params.temperature > 0:
                    gen = torch.Generator(device=self.device)
                    gen.manual_seed((seed + k * _SEED_MIX) % (1 << 63))
                pos = 0 if self.seq2seq else len(r.prompt)  # the decoder's own positions for seq2seq
                rows.append(_Seq(r, k, gen, _Choice(self.tok, r.params.stop, r.on_event is not None), pos, stop_ids))
        if any(r.params.n > 1 for r in reqs):
            expand = torch.tensor([i for i, r in enumerate(reqs) for _ in range(r.params.n)], device=self.device)
            cache.batch_select_indices(expand)
            mask, logits = mask[expand], logits[expand]
            if self.seq2seq:
                batch.encoded, batch.encoded_mask = batch.encoded[expand], batch.encoded_mask[expand]
        tokens = self._sample(logits, rows)
        if batch.rows:
            batch.cache, batch.mask = _merge(batch.cache, batch.mask, cache, mask)
            batch.rows += rows
        else:
            batch.rows, batch.cache, batch.mask = rows, cache, mask
        self._advance(batch, rows, tokens, offset=len(batch.rows) - len(rows))

    def _decode(self, batch: _Batch) -> None:
        """One step for every running row: feed its last token, sample the next."""
        import torch

        rows = batch.rows
        ids = torch.tensor([[s.pending] for s in rows], dtype=torch.long, device=self.device)
        positions = torch.tensor([[s.pos] for s in rows], dtype=torch.long, device=self.device)
        mask = torch.cat([batch.mask, batch.mask.new_ones((len(rows), 1))], dim=1)
        logits, batch.cache = self._forward(ids, mask, positions, batch.cache)
        batch.mask = mask
        for s in rows:
            s.pos += 1
        self.stats["decode_steps"] += 1
        self.stats["batched_steps"] += len(rows) > 1
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(rows))
        self._advance(batch, rows, self._sample(logits, rows), offset=0)

    def _sample(self, logits, rows: list[_Seq]) -> list[int]:
        """Next token per row: argmax when greedy, else a draw from the row's own generator."""
        import torch

        logits = logits.float()
        out = logits.argmax(-1)
        drawn = [i for i, s in enumerate(rows) if s.temperature > 0]
        if drawn:
            idx = torch.tensor(drawn, device=logits.device)
            temps = torch.tensor([rows[i].temperature for i in drawn], device=logits.device)
            probs = torch.softmax(logits[idx] / temps[:, None], dim=-1)
            top_p = torch.tensor([rows[i].top_p for i in drawn], device=logits.device)
            if bool((top_p < 1).any()):
                sorted_p, order = probs.sort(dim=-1, descending=True)
                # Drop tokens once the mass before them already reaches top_p; the top token always stays.
                drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p[:, None]
                probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
            for j, i in enumerate(drawn):
                out[i] = torch.multinomial(probs[j], 1, generator=rows[i].gen)[0]
        return out.tolist()

    def _advance(self, batch: _Batch, rows: list[_Seq], tokens: list[int], offset: int) -> None:
        """Hand each row's new token to its request; drop the rows that finished from the batch."""
        finished = []
        for j, (s, t) in enumerate(zip(rows, tokens)):
            c, p = s.choice, s.req.params
            if s.req.cancelled:
                delta = c.finish("cancelled")
            elif t in s.stop_ids:
                delta = c.finish("stop")
            else:
                delta = c.push(t)
                if c.finish_reason is None and (len(c.ids) >= p.max_new_tokens or s.pos + 1 >= self.context_length):
                    delta += c.finish("length")
            s.pending = t
            if s.req.on_event is not None:
                s.req._emit(Event(s.index, delta, None if s.req.cancelled else t, c.finish_reason))
            if c.finish_reason is not None:
                finished.append(offset + j)
                s.req._finish_choice(s.index, Completion(c.text, c.ids, c.finish_reason))
        if finished:
            self._drop(batch, set(finished))

    def _drop(self, batch: _Batch, gone: set[int]) -> None:
        import torch

        keep = [i for i in range(len(batch.rows)) if i not in gone]
        if not keep:
            batch.rows, batch.cache, batch.mask = [], None, None
            batch.encoded = batch.encoded_mask = None
            return
        index = torch.tensor(keep, device=self.device)
        batch.cache.batch_select_indices(index)
        batch.rows = [batch.rows[i] for i in keep]
        batch.mask = batch.mask[index]
        if self.seq2seq:
            batch.encoded, batch.encoded_mask = batch.encoded[index], batch.encoded_mask[index]
        if self._joinable:  # columns that are padding in every remaining row need no attention
            first = int(batch.mask.any(0).nonzero()[0])
            if first > 0:
                _trim_left(batch.cache, first)
                batch.mask = batch.mask[:, first:]


# ------------------------------------------------------------------------------ cache surgery
def _mergeable(cache) -> bool:
    """Whether the cache is plain per-layer key/value tensors that can be padded and concatenated."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _merge(cache_a, mask_a, cache_b, mask_b):
    """Rows of ``cache_b`` appended to ``cache_a``, both left-padded to the longer length."""
    import torch
    from torch.nn.functional import pad

    ta, tb = mask_a.shape[1], mask_b.shape[1]
    t = max(ta, tb)
    for la, lb in zip(cache_a.layers, cache_b.layers):  # keys/values: [batch, heads, length, head_dim]
        la.keys = torch.cat([pad(la.keys, (0, 0, t - ta, 0)), pad(lb.keys, (0, 0, t - tb, 0))])
        la.values = torch.cat([pad(la.values, (0, 0, t - ta, 0)), pad(lb.values, (0, 0, t - tb, 0))])
    return cache_a, torch.cat([pad(mask_a, (t - ta, 0)), pad(mask_b, (t - tb, 0))])


def _trim_left(cache, n: int) -> None:
    for layer in cache.layers:
        layer.keys = layer.keys[..., n:, :]
        layer.values = layer.values[..., n:, :]
