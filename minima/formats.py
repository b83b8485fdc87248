"""The chat format registry shared by the records and sft stages.

A chat format turns a normalised conversation (``[{"role": "system"|"user"|"assistant",
"content": str}, ...]``) into token ids plus a loss mask (1 exactly on the tokens the model is
trained to produce). Records (``format=chat``) and sft both look formats up here by name.

Extension point -- adding a format::

    from minima.formats import BOS, EOS, ChatFormat, Seg, register

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
``"<|im_start|>"``) in a ``Seg``; the tokenizer must know it as an added token. Formats are classes so that subclasses can override
``encode_exchanges`` wholesale (e.g. to render a Jinja chat template and find the reply spans).

Source shapes understood by :func:`normalise_conversation`:

- ``minichat``: a list of turns ``[{"User": q, "Assistant": a}, ...]`` (MiniChat's JSON);
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``;
- ``alpaca``: ``{"instruction": ..., "input": ..., "output": ...}`` (input optional);
- ``messages``: ``{"messages": [{"role", "content"}, ...]}`` or the bare list (OpenAI style).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from .errors import ConfigError

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


_REGISTRY: dict[str, type["ChatFormat"]] = {}


def register(name: str) -> Callable[[type["ChatFormat"]], type["ChatFormat"]]:
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


def get_format(name: str) -> "ChatFormat":
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

    def encode(self, tokenizer: Any, messages: list[Message], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
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
        return list(tokenizer(piece, add_special_tokens=False, split_special_tokens=content)["input_ids"])


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
        return [Seg(self.user_tag), Seg(user, content=True), Seg(EOS), Seg(self.assistant_tag),
                Seg(assistant, train=True, content=True), Seg(EOS, train=True)]

    def generation_prefix(self, user: str) -> list[Seg]:
        return [Seg(self.user_tag), Seg(user, content=True), Seg(EOS), Seg(self.assistant_tag)]


# ------------------------------------------------------------------------- conversation shapes
SHAPES = ("minichat", "sharegpt", "alpaca", "messages")
_ROLE_ALIASES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system",
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
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(record["output"], "'output'")}]
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
    else:
        raise ValueError(f"unknown source shape {shape!r}; expected one of {', '.join(SHAPES)}")
    split_messages(msgs)  # validates the order
    return msgs


def split_messages(messages: list[Message], allow_open: bool = False) -> tuple[str, list[tuple[str, str]], Optional[str]]:
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
