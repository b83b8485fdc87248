"""The chat format registry shared by the records and sft stages.

A chat format turns a normalised conversation (``[{"role": "system"|"user"|"assistant",
"content": str}, ...]``) into token ids plus a loss mask (1 exactly on the tokens the model is
trained to produce). Records (``format=chat``) and sft both look formats up here by name.

Extension point -- adding a format::

    from minima.data.formats import BOS, EOS, ChatFormat, Seg, register

    @register("my-format")
    class MyFormat(ChatFormat):
        '''One line saying what the format looks like.'''

        def header(self, system):                 # segments before the first user turn
            return [Seg(BOS)] + ([Seg(system, content=True), Seg(EOS)] if system else [])

        def exchange(self, user, assistant):      # one user turn + its reply
            return [Seg("Q:"), Seg(user, content=True), Seg("A:"),
                    Seg(assistant, train=True, content=True), Seg(EOS, train=True)]

        def generation_prefix(self, user):        # a final user turn awaiting the reply
            return [Seg("Q:"), Seg(user, content=True), Seg("A:")]

A format only says which pieces of text and which special tokens follow each other and which of
them are trained (``Seg.train``); the base class tokenizes each text piece on its own (no special
tokens added), resolves ``BOS``/``EOS`` to the tokenizer's ids, and builds the mask. Encoding the
pieces separately is what makes the mask exact: no token straddles a prompt/reply boundary. Message
text is marked ``content=True``: special-token strings inside it (a user typing ``</s>``) stay plain
text. Markup pieces are not, so formats that need other special tokens put their literal text (e.g.
``"<|im_start|>"``) in a ``Seg``; the tokenizer must know it as an added token. Formats are classes
so that subclasses can override ``encode_exchanges`` wholesale (e.g. to render a Jinja chat template
and find the reply spans).

Source shapes understood by :func:`normalise_conversation`:

- ``minichat``: a list of turns ``[{"User": q, "Assistant": a}, ...]`` (MiniChat's JSON);
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``;
- ``alpaca``: ``{"instruction": ..., "input": ..., "output": ...}`` (input optional);
- ``messages``: ``{"messages": [{"role", "content"}, ...]}`` or the bare list (OpenAI style).
- ``mc``: ``{"question", "choices": [...], "gold": index|letter|text}`` (multiple choice; the reply
  is the text of the right choice).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Union

from minima.core.errors import ConfigError

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


class Special(str):
    """A special token named by its tokenizer attribute (``bos`` -> ``tokenizer.bos_token_id``)."""


BOS = Special("bos")
EOS = Special("eos")


@dataclass(frozen=True)
class Seg:
    """One piece of a rendered conversation: text, or a :class:`Special` token.

    Args:
        piece: literal text (tokenized on its own) or ``BOS`` / ``EOS``.
        train: whether these tokens carry a loss (mask = 1).
        content: message text: special-token strings in it are tokenized as plain text.
    """

    piece: Union[str, Special]
    train: bool = False
    content: bool = False


_REGISTRY: dict[str, type[ChatFormat]] = {}


def register(name: str) -> Callable[[type[ChatFormat]], type[ChatFormat]]:
    """Class decorator adding a :class:`ChatFormat` subclass to the registry under ``name``."""

    def deco(cls: type[ChatFormat]) -> type[ChatFormat]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"chat format {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_formats() -> list[str]:
    """Names of the registered chat formats."""
    return sorted(_REGISTRY)


def get_format(name: str) -> ChatFormat:
    """An instance of the chat format ``name`` (ConfigError listing the known ones otherwise)."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ConfigError(
            f"unknown chat format {name!r}",
            fix=f"use one of: {', '.join(available_formats())} (or register a new one in minima/formats.py)",
        ) from None


def special_id(tokenizer: Any, special: Special) -> int:
    """The id of ``BOS``/``EOS`` in ``tokenizer``; a ConfigError when the tokenizer lacks it."""
    tid = getattr(tokenizer, f"{special}_token_id", None)
    if tid is None:
        raise ConfigError(
            f"the tokenizer has no {special.upper()} token but the chat format needs one",
            where=getattr(tokenizer, "name_or_path", None) or None,
            fix=f"set {special}_token in the tokenizer's tokenizer_config.json",
        )
    return int(tid)


def tokenize_texts(tokenizer: Any, texts: list[str], split_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of each text, no special tokens added; the same ids as ``tokenizer(texts,
    add_special_tokens=False, split_special_tokens=...)``.

    A fast (Rust-backed) tokenizer is called directly without offsets: building the ids is then
    about twice as fast as going through ``tokenizer(batch)``.
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        backend.encode_special_tokens = split_special_tokens
        try:
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        finally:
            backend.encode_special_tokens = False
    return list(tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"])


class ChatFormat:
    """Base class: a conversation as segments, tokenized piece by piece with an exact loss mask."""

    name: str = ""

    # --- what a format defines ---------------------------------------------------------------
    def header(self, system: str) -> list[Seg]:
        """Segments before the first user turn (BOS, system prompt)."""
        raise NotImplementedError

    def exchange(self, user: str, assistant: str) -> list[Seg]:
        """Segments of one user turn followed by the assistant's reply."""
        raise NotImplementedError

    def generation_prefix(self, user: str) -> list[Seg]:
        """Segments of a final user turn up to where the assistant's reply starts (inference)."""
        raise NotImplementedError

    # --- shared machinery ----------------------------------------------------------------------
    def segments(self, messages: list[Message], add_generation_prompt: bool = False) -> list[list[Seg]]:
        """Group 0 is the header; then one group per user/assistant exchange.

        With ``add_generation_prompt`` the conversation may end with a user turn, rendered as the
        prompt for the reply.
        """
        system, pairs, pending = split_messages(messages, allow_open=add_generation_prompt)
        groups = [self.header(system)] + [self.exchange(u, a) for u, a in pairs]
        if pending is not None:
            groups.append(self.generation_prefix(pending))
        return groups

    def encode_exchanges(
        self, tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False
    ) -> list[tuple[list[int], list[int]]]:
        """``(ids, mask)`` per group of :meth:`segments`; records truncates at these boundaries."""
        out = []
        for group in self.segments(messages, add_generation_prompt):
            ids: list[int] = []
            mask: list[int] = []
            for seg in group:
                piece = self._tokenize(tokenizer, seg.piece, seg.content)
                ids += piece
                mask += [int(seg.train)] * len(piece)
            out.append((ids, mask))
        return out

    def encode_batch(
        self, tokenizer: Any, conversations: list[list[Message]]
    ) -> list[list[tuple[list[int], list[int]]]]:
        """:meth:`encode_exchanges` of many conversations, with one tokenizer call for all their
        text pieces (what records uses; a subclass overriding encode_exchanges is called per
        conversation instead)."""
        if type(self).encode_exchanges is not ChatFormat.encode_exchanges:
            return [self.encode_exchanges(tokenizer, msgs) for msgs in conversations]
        all_groups = [self.segments(msgs) for msgs in conversations]
        pieces: dict[tuple[str, bool], int] = {}
        for groups in all_groups:
            for group in groups:
                for seg in group:
                    if not isinstance(seg.piece, Special) and seg.piece:
                        pieces.setdefault((seg.piece, seg.content), len(pieces))
        keys = list(pieces)
        ids_of: list[list[int]] = [[] for _ in keys]
        for flag in (False, True):
            idx = [i for i, (_, c) in enumerate(keys) if c == flag]
            for i, ids in zip(idx, tokenize_texts(tokenizer, [keys[i][0] for i in idx], split_special_tokens=flag)):
                ids_of[i] = ids
        specials: dict[str, int] = {}
        out = []
        for groups in all_groups:
            conv = []
            for group in groups:
                ids: list[int] = []
                mask: list[int] = []
                for seg in group:
                    if isinstance(seg.piece, Special):
                        if seg.piece not in specials:
                            specials[seg.piece] = special_id(tokenizer, seg.piece)
                        piece = [specials[seg.piece]]
                    elif seg.piece:
                        piece = ids_of[pieces[(seg.piece, seg.content)]]
                    else:
                        piece = []
                    ids += piece
                    mask += [int(seg.train)] * len(piece)
                conv.append((ids, mask))
            out.append(conv)
        return out

    def encode(
        self, tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Token ids and loss mask (1 on assistant tokens and their end-of-turn token)."""
        ids: list[int] = []
        mask: list[int] = []
        for i, m in self.encode_exchanges(tokenizer, messages, add_generation_prompt):
            ids += i
            mask += m
        return ids, mask

    def render(self, messages: list[Message], add_generation_prompt: bool = False, tokenizer: Any = None) -> str:
        """The conversation as text (special tokens spelled ``<s>``/``</s>`` or the tokenizer's)."""
        spell = {BOS: "<s>", EOS: "</s>"}
        if tokenizer is not None:
            spell = {BOS: tokenizer.bos_token or "<s>", EOS: tokenizer.eos_token or "</s>"}
        text = []
        for group in self.segments(messages, add_generation_prompt):
            prev_special = True
            for seg in group:
                if isinstance(seg.piece, Special):
                    text.append(spell[seg.piece])
                    prev_special = True
                else:
                    # Pieces are tokenized separately; SentencePiece's dummy prefix shows as a space.
                    text.append(seg.piece if prev_special else " " + seg.piece)
                    prev_special = False
        return "".join(text)

    @staticmethod
    def _tokenize(tokenizer: Any, piece: Union[str, Special], content: bool = False) -> list[int]:
        if isinstance(piece, Special):
            return [special_id(tokenizer, piece)]
        if not piece:
            return []
        return tokenize_texts(tokenizer, [piece], split_special_tokens=content)[0]


@register("minichat")
class MiniChatFormat(ChatFormat):
    """MiniChat: ``<s>`` [system ``</s>``] then ``[|User|] q</s>[|Assistant|] a</s>`` per exchange.

    An empty system prompt is left out (just ``<s>``), as MiniChat's default conversation has none.
    The reply and its ``</s>`` are trained; the ``[|Assistant|]`` tag is not.
    """

    user_tag = "[|User|]"
    assistant_tag = "[|Assistant|]"

    def header(self, system: str) -> list[Seg]:
        return [Seg(BOS)] + ([Seg(system, content=True), Seg(EOS)] if system else [])

    def exchange(self, user: str, assistant: str) -> list[Seg]:
        return [
            Seg(self.user_tag),
            Seg(user, content=True),
            Seg(EOS),
            Seg(self.assistant_tag),
            Seg(assistant, train=True, content=True),
            Seg(EOS, train=True),
        ]

    def generation_prefix(self, user: str) -> list[Seg]:
        return [Seg(self.user_tag), Seg(user, content=True), Seg(EOS), Seg(self.assistant_tag)]


# ------------------------------------------------------------------------- conversation shapes
SHAPES = ("minichat", "sharegpt", "alpaca", "messages", "mc")
_ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}


def detect_shape(record: Any) -> str:
    """Guess a record's source shape (see the module docstring); ValueError when none fits."""
    if isinstance(record, list) and record and isinstance(record[0], dict):
        if "User" in record[0] or "Assistant" in record[0]:
            return "minichat"
        if "role" in record[0]:
            return "messages"
    if isinstance(record, dict):
        if "conversations" in record:
            return "sharegpt"
        if "messages" in record:
            return "messages"
        if "instruction" in record and "output" in record:
            return "alpaca"
        if "question" in record and "choices" in record:
            return "mc"
    keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"unrecognised conversation shape (got {keys}); expected one of {', '.join(SHAPES)}")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return value


def normalise_conversation(record: Any, source_shape: Optional[str] = "auto") -> list[Message]:
    """Convert a chat record of any supported shape to ``[{"role", "content"}, ...]``.

    Args:
        record: one parsed JSON record.
        source_shape: one of :data:`SHAPES`, or ``"auto"``/None to detect it.

    Raises:
        ValueError: the record does not have the shape (the message says what is wrong); callers
            add the file and line.
    """
    shape = detect_shape(record) if source_shape in (None, "auto") else source_shape
    msgs: list[Message] = []
    if shape == "minichat":
        if not isinstance(record, list):
            raise ValueError("a MiniChat conversation must be a list of {'User', 'Assistant'} turns")
        for i, turn in enumerate(record):
            if not isinstance(turn, dict) or "User" not in turn or "Assistant" not in turn:
                raise ValueError(f"turn {i} must have 'User' and 'Assistant' keys")
            msgs.append({"role": "user", "content": _text(turn["User"], f"turn {i} 'User'")})
            msgs.append({"role": "assistant", "content": _text(turn["Assistant"], f"turn {i} 'Assistant'")})
    elif shape == "sharegpt":
        conv = record.get("conversations") if isinstance(record, dict) else None
        if not isinstance(conv, list):
            raise ValueError("'conversations' must be a list of {'from', 'value'} messages")
        if isinstance(record.get("system"), str) and record["system"]:
            msgs.append({"role": "system", "content": record["system"]})
        for i, m in enumerate(conv):
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise ValueError(f"message {i} must have 'from' and 'value' keys")
            role = _ROLE_ALIASES.get(str(m["from"]).lower())
            if role is None:
                raise ValueError(f"message {i} has unknown speaker from={m['from']!r}")
            msgs.append({"role": role, "content": _text(m["value"], f"message {i} 'value'")})
    elif shape == "alpaca":
        if not isinstance(record, dict) or "instruction" not in record or "output" not in record:
            raise ValueError("an Alpaca record needs 'instruction' and 'output' keys")
        user = _text(record["instruction"], "'instruction'")
        extra = record.get("input") or ""
        if extra:
            user = user + "\n" + _text(extra, "'input'")
        if isinstance(record.get("system"), str) and record["system"]:
            msgs.append({"role": "system", "content": record["system"]})
        # The input also stays on its own so the alpaca chat format can render an "### Input:" block.
        msgs += [
            {"role": "user", "content": user, **({"input": extra} if extra else {})},
            {"role": "assistant", "content": _text(record["output"], "'output'")},
        ]
    elif shape == "messages":
        items = record.get("messages") if isinstance(record, dict) else record
        if not isinstance(items, list):
            raise ValueError("'messages' must be a list of {'role', 'content'} messages")
        for i, m in enumerate(items):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"message {i} must have 'role' and 'content' keys")
            role = _ROLE_ALIASES.get(str(m["role"]).lower())
            if role is None:
                raise ValueError(f"message {i} has unknown role {m['role']!r}")
            msgs.append({"role": role, "content": _text(m["content"], f"message {i} 'content'")})
    elif shape == "mc":
        if not isinstance(record, dict):
            raise ValueError("an mc record must be an object with 'question', 'choices' and 'gold'")
        msgs = mc_messages(record)
    else:
        raise ValueError(f"unknown source shape {shape!r}; expected one of {', '.join(SHAPES)}")
    split_messages(msgs)  # validates the order
    return msgs


def split_messages(
    messages: list[Message], allow_open: bool = False
) -> tuple[str, list[tuple[str, str]], Optional[str]]:
    """``(system, [(user, assistant), ...], pending_user)`` of a normalised conversation.

    Raises:
        ValueError: roles do not go (system) user assistant user assistant ...; with
            ``allow_open`` a final user turn is returned as ``pending_user``.
    """
    system = ""
    rest = list(messages)
    if rest and rest[0].get("role") == "system":
        system = rest.pop(0)["content"]
    if not rest:
        raise ValueError("the conversation has no user/assistant turns")
    pairs: list[tuple[str, str]] = []
    pending: Optional[str] = None
    for i in range(0, len(rest), 2):
        user = rest[i]
        if user.get("role") != "user":
            raise ValueError(f"message {i} should be a user turn, got role {user.get('role')!r}")
        if i + 1 == len(rest):
            if not allow_open:
                raise ValueError("the conversation ends with a user turn that has no assistant reply")
            pending = user["content"]
            break
        reply = rest[i + 1]
        if reply.get("role") != "assistant":
            raise ValueError(f"message {i + 1} should be an assistant turn, got role {reply.get('role')!r}")
        pairs.append((user["content"], reply["content"]))
    return system, pairs, pending


# ================================================================================================
# sft formats (alpaca, instruction, mc, llama2-chat, chatml) and Jinja chat templates.
#
# Every format is also written as a Jinja ``chat_template`` into the exported tokenizer, and
# ``tokenizer.apply_chat_template(messages)`` must give exactly the ids :meth:`ChatFormat.encode`
# trains on. apply_chat_template tokenizes the rendered string in one go, while ``encode`` tokenizes
# each piece on its own; for a SentencePiece tokenizer every piece then gets the dummy-prefix space.
# The templates therefore spell that space out (``_Jinja.lit`` / ``_Jinja.var``) when the tokenizer
# adds one, which is why a template is built for a given tokenizer.
# ================================================================================================
_U, _A, _S = "\x00user\x00", "\x00assistant\x00", "\x00system\x00"  # sentinels for template derivation
CHOICE_LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class MessageFormat(ChatFormat):
    """Base for formats whose prompt reads more than the user text (alpaca's input, mc's choices).

    Subclasses define :meth:`user_segments` (everything from the user turn up to where the reply
    starts, given the whole user message, the system prompt and whether it is the first turn) and
    :meth:`jinja_parts` (the same in Jinja). The reply is ``reply EOS``, both trained.
    """

    #: token that ends a trained reply (and stops generation)
    end_of_turn: Union[str, Special] = EOS

    def user_segments(self, msg: Message, system: str, first: bool) -> list[Seg]:
        raise NotImplementedError

    def reply_segments(self, reply: str) -> list[Seg]:
        return [Seg(reply, train=True, content=True), Seg(self.end_of_turn, train=True)]

    def exchange(self, user: str, assistant: str) -> list[Seg]:
        return self.user_segments({"role": "user", "content": user}, "", False) + self.reply_segments(assistant)

    def generation_prefix(self, user: str) -> list[Seg]:
        return self.user_segments({"role": "user", "content": user}, "", False)

    def segments(self, messages: list[Message], add_generation_prompt: bool = False) -> list[list[Seg]]:
        system, pairs, pending = split_messages(messages, allow_open=add_generation_prompt)
        users = [m for m in messages if m.get("role") == "user"]
        groups = [self.header(system)]
        for i, (_, reply) in enumerate(pairs):
            groups.append(self.user_segments(users[i], system, i == 0) + self.reply_segments(reply))
        if pending is not None:
            groups.append(self.user_segments(users[len(pairs)], system, not pairs))
        return groups

    def jinja_parts(self, j: _Jinja) -> tuple[str, str, str]:
        """(header, user turn, assistant turn) Jinja snippets; ``m`` is the message, ``system`` set."""
        raise NotImplementedError


def _split_alpaca(msg: Message) -> tuple[str, str]:
    """(instruction, input) of a user message; ``input`` comes from the Alpaca source shape."""
    text, extra = msg.get("content", ""), msg.get("input") or ""
    if extra and text.endswith("\n" + extra):
        text = text[: -len(extra) - 1]
    return text, extra


@register("alpaca")
class AlpacaFormat(MessageFormat):
    """Stanford-Alpaca-style prompt (our own preamble wording), with or without an ``### Input:``.

    ``<s>``[system] then per exchange: preamble, ``### Instruction:``, [``### Input:``],
    ``### Response:`` and the reply + ``</s>``. The input comes from an Alpaca record's ``input``
    field (kept on the user message by :func:`normalise_conversation`).
    """

    preamble = "The instruction below describes a task. Write a response that carries it out."
    preamble_input = (
        "The instruction below describes a task, and the input after it gives the context. "
        "Write a response that carries out the task."
    )

    def header(self, system: str) -> list[Seg]:
        return [Seg(BOS)] + ([Seg(system, content=True)] if system else [])

    def user_segments(self, msg, system, first):
        instruction, extra = _split_alpaca(msg)
        if extra:
            return [
                Seg(self.preamble_input + "\n\n### Instruction:\n"),
                Seg(instruction, content=True),
                Seg("\n\n### Input:\n"),
                Seg(extra, content=True),
                Seg("\n\n### Response:\n"),
            ]
        return [
            Seg(self.preamble + "\n\n### Instruction:\n"),
            Seg(instruction, content=True),
            Seg("\n\n### Response:\n"),
        ]

    def jinja_parts(self, j):
        header = j.bos + j.var("system")
        # The instruction is the content without the "\n" + input tail that the Alpaca shape appends.
        user = (
            "{%- set extra = m.get('input') or '' -%}"
            "{%- set instr = m['content'] -%}"
            "{%- if extra and instr.endswith('\\n' + extra) -%}"
            "{%- set instr = instr[:(instr|length) - (extra|length) - 1] -%}"
            "{%- endif -%}"
            "{%- if extra -%}"
            + j.lit(self.preamble_input + "\n\n### Instruction:\n")
            + j.var("instr")
            + j.lit("\n\n### Input:\n")
            + j.var("extra")
            + j.lit("\n\n### Response:\n")
            + "{%- else -%}"
            + j.lit(self.preamble + "\n\n### Instruction:\n")
            + j.var("instr")
            + j.lit("\n\n### Response:\n")
            + "{%- endif -%}"
        )
        return header, user, j.reply(self.end_of_turn)


@register("instruction")
class InstructionFormat(MessageFormat):
    """``<s>``[system] then ``### INSTRUCTION:`` q [``### INPUT:`` x] ``### RESPONSE:`` a ``</s>`` per exchange.

    The layout of the JAX instruction-tuning recipe: ``### INSTRUCTION:\n{q}\n\n### RESPONSE:\n{a}``, with
    ``\n\n### INPUT:\n{x}`` after the instruction when an Alpaca record has an input.
    """

    def header(self, system: str) -> list[Seg]:
        return [Seg(BOS)] + ([Seg(system, content=True)] if system else [])

    def user_segments(self, msg, system, first):
        instruction, extra = _split_alpaca(msg)
        segs = [Seg("### INSTRUCTION:\n"), Seg(instruction, content=True)]
        if extra:
            segs += [Seg("\n\n### INPUT:\n"), Seg(extra, content=True)]
        return segs + [Seg("\n\n### RESPONSE:\n")]

    def jinja_parts(self, j):
        user = (
            "{%- set extra = m.get('input') or '' -%}"
            "{%- set instr = m['content'] -%}"
            "{%- if extra and instr.endswith('\\n' + extra) -%}"
            "{%- set instr = instr[:(instr|length) - (extra|length) - 1] -%}"
            "{%- endif -%}"
            + j.lit("### INSTRUCTION:\n")
            + j.var("instr")
            + "{%- if extra -%}"
            + j.lit("\n\n### INPUT:\n")
            + j.var("extra")
            + "{%- endif -%}"
            + j.lit("\n\n### RESPONSE:\n")
        )
        return j.bos + j.var("system"), user, j.reply(self.end_of_turn)


def mc_choices_text(choices: list[str]) -> str:
    """``(0): first (1): second ...`` -- the CHOICES block of the mc format (the JAX recipe's layout)."""
    return " ".join(f"({i}): {c}" for i, c in enumerate(choices))


def mc_answer_text(choices: list[str], gold: int) -> str:
    """The reply an mc record trains on: the text of the right choice."""
    return choices[gold]


def jax_prompt(msg: Message) -> str:
    """The exact prompt text the ``mc`` format writes for a user message, up to where the reply starts.

    - with ``choices``: ``### QUESTION:\\n{q}\\n\\n### CHOICES:\\n(0): a (1): b\\n\\n### ANSWER:\\n``;
    - with two ``options`` (Winogrande): ``### SENTENCE:\\n{s}\\n\\n### OPTION1:\\n{o1}\\n\\n### OPTION2:\\n{o2}``
      ``\\n\\n### ANSWER:\\n``;
    - otherwise (a free question, e.g. GSM8K): ``### QUESTION:\\n{q}\\n\\n### ANSWER:\\n``.

    The reply follows it verbatim. The tokens are those of the pieces, each tokenized on its own.
    """
    return "".join(s.piece for s in MCFormat().user_segments(msg, "", True) if not isinstance(s.piece, Special))


@register("mc")
class MCFormat(MessageFormat):
    """The prompt layout of the JAX instruction-tuning recipe for multiple choice, Winogrande and QA.

    ``<s>``[system] then per exchange :func:`jax_prompt` (``### QUESTION:`` / ``### CHOICES:`` with
    ``(0): ...`` options / ``### ANSWER:``; Winogrande's ``### SENTENCE:`` / ``### OPTION1:`` /
    ``### OPTION2:``), the reply (the answer text) and ``</s>``. Sections are separated by a blank line and
    each heading is followed by a newline. The choices come from the user message's ``choices`` list (the
    ``mc`` source shape), the Winogrande options from its ``options`` pair.
    """

    def header(self, system: str) -> list[Seg]:
        return [Seg(BOS)] + ([Seg(system, content=True)] if system else [])

    def user_segments(self, msg, system, first):
        options = msg.get("options")
        if options:
            if len(options) != 2:
                raise ValueError(f"a Winogrande message needs 2 options, got {len(options)}")
            return [
                Seg("### SENTENCE:\n"),
                Seg(msg["content"], content=True),
                Seg("\n\n### OPTION1:\n"),
                Seg(str(options[0]), content=True),
                Seg("\n\n### OPTION2:\n"),
                Seg(str(options[1]), content=True),
                Seg("\n\n### ANSWER:\n"),
            ]
        segs = [Seg("### QUESTION:\n"), Seg(msg["content"], content=True)]
        if msg.get("choices"):
            segs += [Seg("\n\n### CHOICES:\n"), Seg(mc_choices_text([str(c) for c in msg["choices"]]), content=True)]
        return segs + [Seg("\n\n### ANSWER:\n")]

    def jinja_parts(self, j):
        winogrande = (
            j.lit("### SENTENCE:\n")
            + j.var("m['content']")
            + j.lit("\n\n### OPTION1:\n")
            + j.var("(m['options'][0]|string)")
            + j.lit("\n\n### OPTION2:\n")
            + j.var("(m['options'][1]|string)")
        )
        question = (
            j.lit("### QUESTION:\n")
            + j.var("m['content']")
            + "{%- if m.get('choices') -%}{%- set ns = namespace(text='') -%}"
            + "{%- for c in m['choices'] -%}{%- set ns.text = ns.text + ('' if loop.first else ' ') + '(' "
            + "+ (loop.index0|string) + '): ' + (c|string) -%}{%- endfor -%}"
            + j.lit("\n\n### CHOICES:\n")
            + j.var("ns.text")
            + "{%- endif -%}"
        )
        user = (
            "{%- if m.get('options') -%}"
            + winogrande
            + "{%- else -%}"
            + question
            + "{%- endif -%}"
            + j.lit("\n\n### ANSWER:\n")
        )
        return j.bos + j.var("system"), user, j.reply(self.end_of_turn)


@register("llama2-chat")
class Llama2ChatFormat(MessageFormat):
    """LLaMA-2-chat: ``<s>[INST] <<SYS>>`` system ``<</SYS>>`` q ``[/INST]`` a ``</s>``, one ``<s>`` per exchange.

    The system prompt sits inside the first ``[INST]`` block, as in Meta's reference code.
    """

    def header(self, system: str) -> list[Seg]:
        return []

    def user_segments(self, msg, system, first):
        segs = [Seg(BOS), Seg("[INST]")]
        if first and system:
            segs += [Seg("<<SYS>>\n"), Seg(system, content=True), Seg("\n<</SYS>>\n\n")]
        return segs + [Seg(msg["content"], content=True), Seg("[/INST]")]

    def jinja_parts(self, j):
        user = (
            j.bos
            + j.lit("[INST]")
            + "{%- if loop.first and system -%}"
            + j.lit("<<SYS>>\n")
            + j.var("system")
            + j.lit("\n<</SYS>>\n\n")
            + "{%- endif -%}"
            + j.var("m['content']")
            + j.lit("[/INST]")
        )
        return "", user, j.reply(self.end_of_turn)


@register("chatml")
class ChatMLFormat(MessageFormat):
    """ChatML: ``<|im_start|>role\\n`` text ``<|im_end|>\\n``; the reply and its ``<|im_end|>`` are trained.

    ``<|im_start|>`` / ``<|im_end|>`` should be added tokens (sft adds them when it builds records
    from raw files); ``<|im_end|>`` is the end-of-turn token generation stops at.
    """

    added_tokens = ("<|im_start|>", "<|im_end|>")
    end_of_turn = "<|im_end|>"

    def header(self, system: str) -> list[Seg]:
        return [Seg("<|im_start|>system\n"), Seg(system, content=True), Seg("<|im_end|>\n")] if system else []

    def user_segments(self, msg, system, first):
        return [
            Seg("<|im_start|>user\n"),
            Seg(msg["content"], content=True),
            Seg("<|im_end|>\n"),
            Seg("<|im_start|>assistant\n"),
        ]

    def reply_segments(self, reply: str) -> list[Seg]:
        return super().reply_segments(reply) + [Seg("\n")]

    def jinja_parts(self, j):
        header = (
            "{%- if system -%}"
            + j.lit("<|im_start|>system\n")
            + j.var("system")
            + j.lit("<|im_end|>\n")
            + "{%- endif -%}"
        )
        user = (
            j.lit("<|im_start|>user\n")
            + j.var("m['content']")
            + j.lit("<|im_end|>\n")
            + j.lit("<|im_start|>assistant\n")
        )
        return header, user, j.reply(self.end_of_turn) + j.lit("\n")


@register("tulu")
class TuluFormat(MessageFormat):
    """Tulu 2 / open-instruct: ``<s><|system|>\\n`` s ``\\n<|user|>\\n`` q ``\\n<|assistant|>\\n`` a ``</s>\\n``.

    The text of open-instruct's ``encode_with_messages_format`` (BOS, then each message as
    ``<|role|>\\n`` text ``\\n``, a reply as its stripped text + EOS + ``\\n``); generation starts
    after ``<|assistant|>\\n`` as its ``create_prompt_with_tulu_chat_format`` does. The role markers are
    plain text, not added tokens.

    Unlike the other formats, the conversation is tokenized whole, as open-instruct tokenizes it, so
    a SentencePiece tokenizer gives Tulu's ids (no word-start marker on text after a newline); the
    mask boundaries are the token counts of the text up to each piece, which is how open-instruct
    finds them. The reply and its EOS are trained; the newline after the EOS is not (open-instruct
    labels it too, but generation stops at the EOS, so it is never produced). Special-token strings
    typed inside a message are special tokens here, as they are in open-instruct.
    """

    def header(self, system: str) -> list[Seg]:
        return [Seg(BOS)] + ([Seg("<|system|>\n"), Seg(system, content=True), Seg("\n")] if system else [])

    def user_segments(self, msg, system, first):
        return [Seg("<|user|>\n"), Seg(msg["content"], content=True), Seg("\n<|assistant|>\n")]

    def reply_segments(self, reply: str) -> list[Seg]:
        return super().reply_segments(reply.strip()) + [Seg("\n")]

    def encode_exchanges(
        self, tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False
    ) -> list[tuple[list[int], list[int]]]:
        spell = {BOS: tokenizer.bos_token, EOS: tokenizer.eos_token}
        for special in (BOS, EOS):
            special_id(tokenizer, special)  # a clear error when the tokenizer lacks one
        groups = self.segments(messages, add_generation_prompt)
        prefixes, text = [], ""
        for group in groups:
            for seg in group:
                text += spell[seg.piece] if isinstance(seg.piece, Special) else seg.piece
                prefixes.append(text)
        counts = [len(ids) for ids in tokenize_texts(tokenizer, prefixes, split_special_tokens=False)]
        ids = tokenize_texts(tokenizer, [text], split_special_tokens=False)[0]
        mask = [0] * len(ids)
        out, k, start, group_start = [], 0, 0, 0
        for group in groups:
            for seg in group:
                end = counts[k]
                if seg.train:
                    mask[start:end] = [1] * (end - start)
                start, k = end, k + 1
            out.append((ids[group_start:start], mask[group_start:start]))
            group_start = start
        return out

    def jinja_template(self) -> str:
        """The template as plain text concatenation (the conversation is tokenized whole)."""
        import json

        def lit(t: str) -> str:
            return "{{ " + json.dumps(t) + " }}"

        return (
            "{#- minima chat format 'tulu' -#}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
            "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
            "{{ bos_token }}{%- if system -%}" + lit("<|system|>\n") + "{{ system }}" + lit("\n") + "{%- endif -%}"
            "{%- for m in turns -%}"
            "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
            "{{ raise_exception('roles must alternate user/assistant after an optional system message') }}"
            "{%- endif -%}"
            "{%- if m['role'] == 'user' -%}"
            + lit("<|user|>\n")
            + "{{ m['content'] }}"
            + lit("\n<|assistant|>\n")
            + "{%- else -%}{%- generation -%}{{ m['content'] | trim }}{{ eos_token }}{%- endgeneration -%}"
            + lit("\n")
            + "{%- endif -%}{%- endfor -%}"
        )

    def jinja_parts(self, j):
        raise NotImplementedError("the tulu template is whole (jinja_template)")


class _Jinja:
    """Jinja snippet builders that reproduce piece-by-piece tokenization for one tokenizer.

    Whether a piece needs a space in front in the rendered string depends on what precedes it (the
    string start, a special token, or text) and on the tokenizer (SentencePiece's dummy prefix,
    prepended once or after every special token); :func:`spacing` measures it, and the template
    tracks what it wrote last in ``st.prev``.
    """

    def __init__(self, tokenizer: Any):
        self.sp = spacing(tokenizer)
        self.added = sorted((str(t) for t in tokenizer.get_added_vocab()), key=len, reverse=True)
        self.bos = "{{ bos_token }}{%- set st.prev = 'special' -%}"
        self.eos = "{{ eos_token }}{%- set st.prev = 'special' -%}"

    @staticmethod
    def quote(text: str) -> str:
        import json

        return json.dumps(text, ensure_ascii=False)

    def prelude(self) -> str:
        """Set-up the snippets rely on: the spacing tables and the last-written state."""
        plain = {k: v for (k, lead), v in self.sp.items() if not lead}
        lead = {k: v for (k, is_lead), v in self.sp.items() if is_lead}
        return (
            "{%- set st = namespace(prev='start') -%}"
            "{%- set sp = " + _jinja_dict(plain) + " -%}{%- set spl = " + _jinja_dict(lead) + " -%}"
        )

    def lit(self, text: str) -> str:
        """A literal markup piece (tokenized on its own in training)."""
        if not text:
            return ""
        if any(text.startswith(t) for t in self.added):
            out = "{{ " + self.quote(text) + " }}"
        else:
            table = "spl" if text.startswith(" ") else "sp"
            out = "{{ " + table + "[st.prev] + " + self.quote(text) + " }}"
        last = "special" if any(text.endswith(t) for t in self.added) else "text"
        return out + "{%- set st.prev = '" + last + "' -%}"

    def var(self, expr: str) -> str:
        """A message-text piece held in the Jinja expression ``expr`` (nothing when empty)."""
        return (
            "{%- if "
            + expr
            + " -%}{{ (spl if ("
            + expr
            + ").startswith(' ') else sp)[st.prev] + "
            + expr
            + " }}{%- set st.prev = 'text' -%}{%- endif -%}"
        )

    def special(self, piece: Union[str, Special]) -> str:
        if isinstance(piece, Special):
            return self.bos if piece == BOS else self.eos
        return self.lit(piece)

    def reply(self, end_of_turn: Union[str, Special]) -> str:
        """The trained reply + end-of-turn token, marked for ``return_assistant_tokens_mask``."""
        return "{%- generation -%}" + self.var("m['content']") + self.special(end_of_turn) + "{%- endgeneration -%}"


def _jinja_dict(d: dict[str, str]) -> str:
    return "{" + ", ".join(f"'{k}': '{v}'" for k, v in sorted(d.items())) + "}"


def spacing(tokenizer: Any) -> dict[tuple[str, bool], str]:
    """``(previous, piece starts with a space) -> "" | " "``: what to write before a piece so that
    the whole rendered string tokenizes like the pieces did one by one.

    ``previous`` is ``start`` (nothing written yet), ``special`` (a special token) or ``text``.
    """
    anchor = tokenizer.eos_token or tokenizer.bos_token or ""

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    out: dict[tuple[str, bool], str] = {}
    for lead in (False, True):
        word = (" " if lead else "") + "Hello world"
        alone = ids(word)
        for kind, ctx in (("start", ""), ("special", anchor), ("text", "Hi.")):
            want = ids(ctx) + alone
            out[(kind, lead)] = next((s for s in ("", " ") if ids(ctx + s + word) == want), "")
    return out


def _derive_parts(fmt: ChatFormat, j: _Jinja) -> tuple[str, str, str]:
    """Jinja parts of a plain :class:`ChatFormat` from its segments (rendered with sentinels)."""

    def render(segs: list[Seg], names: dict[str, str]) -> str:
        out = []
        for s in segs:
            if isinstance(s.piece, Special):
                out.append(j.special(s.piece))
            elif s.piece in names:
                out.append(j.var(names[s.piece]))
            elif any(x in s.piece for x in (_U, _A, _S)):
                raise NotImplementedError(f"format {fmt.name!r}: message text must be a Seg of its own")
            else:
                out.append(j.lit(s.piece))
        return "".join(out)

    prefix = fmt.generation_prefix(_U)
    ex = fmt.exchange(_U, _A)
    if ex[: len(prefix)] != prefix:
        raise NotImplementedError(
            f"format {fmt.name!r}: exchange() does not start with generation_prefix(); give it jinja_parts()"
        )
    header = (
        "{%- if system -%}"
        + render(fmt.header(_S), {_S: "system"})
        + "{%- else -%}"
        + render(fmt.header(""), {})
        + "{%- endif -%}"
    )
    user = render(prefix, {_U: "m['content']"})
    rest = ex[len(prefix) :]
    trained = [s for s in rest if s.train]
    after = rest[len(trained) :] if rest[: len(trained)] == trained else None
    if after is None:  # trained pieces not contiguous at the start: no generation marks
        assistant = render(rest, {_A: "m['content']"})
    else:
        assistant = (
            "{%- generation -%}" + render(trained, {_A: "m['content']"}) + "{%- endgeneration -%}" + render(after, {})
        )
    return header, user, assistant


def chat_template(fmt: Union[str, ChatFormat], tokenizer: Any) -> str:
    """The Jinja chat template of ``fmt`` for ``tokenizer`` (apply_chat_template == encode).

    After each user turn the template writes the prompt for the reply (e.g. ``[|Assistant|]``), so
    ``add_generation_prompt`` needs no extra text; a conversation ending in a user turn is the
    prompt for generation. Roles out of order raise an exception while rendering.
    """
    f = get_format(fmt) if isinstance(fmt, str) else fmt
    if hasattr(f, "jinja_template"):  # a format tokenized whole has a plain template
        return f.jinja_template()
    j = _Jinja(tokenizer)
    header, user, assistant = f.jinja_parts(j) if isinstance(f, MessageFormat) else _derive_parts(f, j)
    return (
        "{#- minima chat format '"
        + f.name
        + "' -#}"
        + j.prelude()
        + "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
        + header
        + "{%- for m in turns -%}"
        "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('roles must alternate user/assistant after an optional system message') }}"
        "{%- endif -%}"
        "{%- if m['role'] == 'user' -%}" + user + "{%- else -%}" + assistant + "{%- endif -%}"
        "{%- endfor -%}"
    )


def stop_token_ids(fmt: Union[str, ChatFormat], tokenizer: Any) -> list[int]:
    """Token ids that end a reply in ``fmt`` (EOS, plus e.g. ``<|im_end|>``), for generation_config."""
    f = get_format(fmt) if isinstance(fmt, str) else fmt
    ids = [special_id(tokenizer, EOS)] if tokenizer.eos_token_id is not None else []
    eot = getattr(f, "end_of_turn", EOS)
    if not isinstance(eot, Special):
        tid = tokenizer.convert_tokens_to_ids(eot)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid not in ids:
            ids.append(tid)
    return ids


def mc_messages(record: dict) -> list[Message]:
    """The ``mc`` source shape ``{"question", "choices", "gold"|"answer"}`` as a conversation."""
    choices = record.get("choices")
    if not isinstance(choices, list) or not choices or len(choices) > len(CHOICE_LABELS):
        raise ValueError(f"'choices' must be a list of 1..{len(CHOICE_LABELS)} options")
    choices = [str(c) for c in choices]
    gold = record.get("gold", record.get("answer"))
    if isinstance(gold, str) and gold.strip() in choices:
        gold = choices.index(gold.strip())
    elif isinstance(gold, str) and len(gold.strip()) == 1 and gold.strip().upper() in CHOICE_LABELS[: len(choices)]:
        gold = CHOICE_LABELS.index(gold.strip().upper())
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise ValueError(
            f"'gold' must be a choice index 0..{len(choices) - 1}, a letter or the choice text (got {gold!r})"
        )
    return [
        {"role": "user", "content": _text(record.get("question"), "'question'"), "choices": choices},
        {"role": "assistant", "content": mc_answer_text(choices, gold)},
    ]
