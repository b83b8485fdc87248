"""Preference pairs: the input shapes, one normalised pair, and its token ids (records ``format=preference``).

Input shapes, detected per file from its first record (a later record of another shape is an error at
its ``file:line``):

- ``strings``: ``{"prompt": str, "chosen": str, "rejected": str}``;
- ``messages``: ``chosen`` and ``rejected`` are message lists (``{"role", "content"}``). Either whole
  conversations that share the prompt turns (UltraFeedback-binarized; its ``prompt`` string is then
  ignored), or the replies alone after a ``prompt`` given as a message list or a string (one user turn);
- ``hh``: ``{"chosen": str, "rejected": str}`` raw hh-rlhf transcripts of ``\\n\\nHuman:`` /
  ``\\n\\nAssistant:`` turns; the turns they share, up to the last shared user turn, are the prompt.

Every shape becomes a :class:`Pair`: the prompt as messages ending with a user turn, the two
continuations as messages starting with an assistant turn, and, where the input is text, the text
split at the same place (for ``preference_template=plain``, base models).

Token ids (:func:`encode_pairs`): with a chat format, a conversation is rendered exactly as sft renders
it (:meth:`ChatFormat.encode_batch`); the prompt is everything up to the first trained token of the
reply, and a response's mask is sft's loss mask (1 on the assistant's tokens and their end-of-turn
token). Plain text follows TRL: ``BOS + prompt`` and ``BOS + prompt + completion`` are tokenized
whole and split where they part, and EOS ends each response (mask 1 throughout).
Truncation (:func:`truncate_pair`): the prompt keeps its last ``max_prompt_length`` tokens (and its
BOS), then both responses are cut to what is left of ``max_length``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Optional

from minima.data.formats import normalise_conversation, tokenize_texts

SHAPES = ("strings", "messages", "hh")
OK, TRUNCATED, DROPPED, IDENTICAL = 0, 1, 2, 3
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class Pair:
    """One preference pair: shared prompt, preferred (chosen) and dispreferred (rejected) continuations.

    ``prompt`` ends with a user turn; ``chosen`` / ``rejected`` start with an assistant turn. ``text`` is
    ``(prompt, chosen, rejected)`` as plain text when the input was text (strings and hh shapes).
    """

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    text: Optional[tuple[str, str, str]] = None

    @property
    def identical(self) -> bool:
        return self.chosen == self.rejected if self.text is None else self.text[1] == self.text[2]

    def chars(self) -> int:
        return sum(len(m["content"]) for m in self.prompt + self.chosen + self.rejected)


# --------------------------------------------------------------------------------------- shapes
def detect_shape(record: Any) -> str:
    """The shape of one record (see the module docstring); ValueError when none fits."""
    if isinstance(record, dict) and "chosen" in record and "rejected" in record:
        c, r = record["chosen"], record["rejected"]
        if isinstance(c, list) and isinstance(r, list):
            return "messages"
        if isinstance(c, str) and isinstance(r, str):
            if isinstance(record.get("prompt"), list):
                raise ValueError("'prompt' is a message list but 'chosen'/'rejected' are strings")
            return "strings" if "prompt" in record else "hh"
    keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
    raise ValueError(
        f"unrecognised preference record (got {keys}); expected {{prompt, chosen, rejected}} strings, "
        "chosen/rejected message lists, or raw hh-rlhf chosen/rejected transcripts"
    )


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return value


def parse_hh(text: str) -> tuple[list[dict], list[int]]:
    """An hh-rlhf transcript as messages, and the character offset where each turn's content starts."""
    marks = list(_HH_TURN.finditer(text))
    if not marks or text[: marks[0].start()].strip():
        raise ValueError("an hh-rlhf transcript must start with '\\n\\nHuman:'")
    msgs, starts = [], []
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        role = "user" if m.group(1) == "Human" else "assistant"
        if msgs and msgs[-1]["role"] == role:
            raise ValueError(f"turn {i} repeats the {role} role (hh-rlhf turns alternate Human/Assistant)")
        msgs.append({"role": role, "content": text[m.end() : end].strip()})
        starts.append(m.end())
    return msgs, starts


def _split(chosen: list[dict], rejected: list[dict]) -> int:
    """Number of messages in the shared prompt: the common prefix, cut back to end on a user turn."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == len(chosen) == len(rejected):  # identical conversations: split before the last reply
        k -= 1
    while k > 0 and chosen[k - 1]["role"] != "user":
        k -= 1
    if k == 0:
        raise ValueError("chosen and rejected share no prompt that ends with a user turn")
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if len(conv) == k or conv[k]["role"] != "assistant":
            raise ValueError(f"{name} has no assistant reply after the shared prompt")
    return k


def normalise_pair(record: Any, shape: str) -> Pair:
    """One record of ``shape`` as a :class:`Pair`; ValueError naming what is wrong (callers add file:line)."""
    if detect_shape(record) != shape:
        raise ValueError(f"record has the {detect_shape(record)} shape, but the file's first record has {shape}")
    if shape == "strings":
        prompt, chosen, rejected = (_text(record[k], f"'{k}'") for k in ("prompt", "chosen", "rejected"))
        if _HH_TURN.match(prompt) and prompt.rstrip().endswith("Assistant:"):  # an hh-rlhf prompt already split off
            msgs, _ = parse_hh(prompt.rstrip() + " x")
            msgs = msgs[:-1]
        else:
            msgs = [{"role": "user", "content": prompt}]
        normalise_conversation(msgs + [{"role": "assistant", "content": chosen}], "messages")
        return Pair(
            msgs,
            [{"role": "assistant", "content": chosen}],
            [{"role": "assistant", "content": rejected}],
            (prompt, chosen, rejected),
        )
    if shape == "hh":
        c_text, r_text = _text(record["chosen"], "'chosen'"), _text(record["rejected"], "'rejected'")
        c_msgs, c_starts = parse_hh(c_text)
        r_msgs, r_starts = parse_hh(r_text)
        for msgs in (c_msgs, r_msgs):
            normalise_conversation(msgs, "messages")  # alternating turns that end with the assistant
        k = _split(c_msgs, r_msgs)
        # The text prompt ends right after the "\n\nAssistant:" that opens the first differing reply.
        cut_c, cut_r = c_starts[k], r_starts[k]
        return Pair(c_msgs[:k], c_msgs[k:], r_msgs[k:], (c_text[:cut_c], c_text[cut_c:], r_text[cut_r:]))
    # messages
    prompt = record.get("prompt")
    full = []
    for name in ("chosen", "rejected"):
        conv = record[name]
        if conv and isinstance(conv[0], dict) and str(conv[0].get("role", "")).lower() == "assistant":
            if isinstance(prompt, list):
                conv = list(prompt) + list(conv)
            elif isinstance(prompt, str):
                conv = [{"role": "user", "content": prompt}] + list(conv)
            else:
                raise ValueError(f"'{name}' starts with the assistant but there is no 'prompt'")
        try:
            full.append(normalise_conversation({"messages": conv}, "messages"))
        except ValueError as e:
            raise ValueError(f"'{name}': {e}") from None
    k = _split(full[0], full[1])
    return Pair(full[0][:k], full[0][k:], full[1][k:])


# ------------------------------------------------------------------------------------ encoding
def _first_trained(mask: list[int]) -> int:
    return next((i for i, m in enumerate(mask) if m), -1)


def encode_pairs(tokenizer: Any, chat: Any, pairs: list[Pair], bos_id: Optional[int], eos_id: int) -> list[tuple]:
    """``(prompt_ids, chosen_ids, chosen_mask, rejected_ids, rejected_mask)`` of each pair.

    ``chat`` is a :class:`~minima.data.formats.ChatFormat` (the sft rendering) or None for plain text.
    """
    if chat is None:
        return _encode_plain(tokenizer, pairs, bos_id, eos_id)
    convs = [p.prompt + cont for p in pairs for cont in (p.chosen, p.rejected)]
    encoded = chat.encode_batch(tokenizer, convs)
    out = []
    for i, p in enumerate(pairs):
        g = sum(m["role"] == "user" for m in p.prompt)  # groups: header, then one per exchange
        parts = []
        for groups in encoded[2 * i : 2 * i + 2]:
            head = [t for ids, _ in groups[:g] for t in ids]
            ids, mask = groups[g]
            start = _first_trained(mask)
            if start < 0:
                raise ValueError(f"chat format {chat.name!r} trains no token of the reply")
            prompt = head + ids[:start]
            rest_ids = ids[start:] + [t for ids_, _ in groups[g + 1 :] for t in ids_]
            rest_mask = mask[start:] + [m for _, mask_ in groups[g + 1 :] for m in mask_]
            parts.append((prompt, rest_ids, rest_mask))
        (p_c, c_ids, c_mask), (p_r, r_ids, r_mask) = parts
        if p_c != p_r:
            raise ValueError("the chat format renders the shared prompt differently for chosen and rejected")
        out.append((p_c, c_ids, c_mask, r_ids, r_mask))
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _encode_plain(tokenizer: Any, pairs: list[Pair], bos_id: Optional[int], eos_id: int) -> list[tuple]:
    for p in pairs:
        if p.text is None:
            raise ValueError("preference_template=plain needs text pairs (strings or hh-rlhf), not message lists")
    texts = [t for p in pairs for t in (p.text[0], p.text[0] + p.text[1], p.text[0] + p.text[2])]
    ids = tokenize_texts(tokenizer, texts, split_special_tokens=True)
    lead = [bos_id] if bos_id is not None else []
    out = []
    for i in range(len(pairs)):
        p, pc, pr = (lead + x for x in ids[3 * i : 3 * i + 3])
        # Tokens can merge across the prompt/completion boundary: the completion starts where they part.
        k = min(_common_prefix(p, pc), _common_prefix(p, pr))
        c, r = pc[k:] + [eos_id], pr[k:] + [eos_id]
        out.append((p[:k], c, [1] * len(c), r, [1] * len(r)))
    return out


def truncate_pair(enc: tuple, max_length: int, max_prompt_length: int, bos_id: Optional[int]) -> tuple[tuple, int]:
    """The pair cut to the limits, and its status: OK, TRUNCATED, DROPPED (a response has no trained token
    left) or IDENTICAL (chosen == rejected: no preference to learn)."""
    prompt, c, cm, r, rm = enc
    if c == r and cm == rm:
        return enc, IDENTICAL
    status = OK
    if len(prompt) > max_prompt_length:
        keep_bos = bos_id is not None and prompt and prompt[0] == bos_id
        tail = max_prompt_length - int(keep_bos)
        prompt = ([bos_id] if keep_bos else []) + (prompt[-tail:] if tail > 0 else [])
        status = TRUNCATED
    room = max_length - len(prompt)
    if len(c) > room or len(r) > room:
        c, cm, r, rm = c[:room], cm[:room], r[:room], rm[:room]
        status = TRUNCATED
    if not any(cm) or not any(rm):
        return (prompt, c, cm, r, rm), DROPPED
    return (prompt, c, cm, r, rm), status


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id, added tokens included): equal ids for equal text."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
