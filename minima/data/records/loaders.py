"""Named dataset loaders and column mappings: raw records of public datasets -> conversations.

A records source picks a loader with ``loader:`` (or by its ``name`` when that is a loader's name, or
starts with one followed by ``-`` or ``_``: ``arc-easy``, ``winogrande_xl``; ``loader: none`` turns that
off), or maps its columns with ``columns:``. Every loader turns one raw record into a normalised conversation (see
:mod:`minima.data.formats`), in one of two shapes:

- **mc**: the user message carries ``choices`` (or Winogrande's two ``options``) and the reply is the
  right choice's text; the ``mc`` chat format writes the JAX recipe's ``### QUESTION:`` /
  ``### CHOICES:`` / ``### ANSWER:`` (or ``### SENTENCE:`` / ``### OPTION1:`` / ``### OPTION2:``) prompt;
- **instruction**: an optional system prompt, a user turn and the reply.

Named loaders (the schemas they read):

=================  =====  =====================================================================
name               shape  raw schema
=================  =====  =====================================================================
``arc``            mc     AI2 ``{"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}``
                          (labels A-E or 1-4), HF ai2_arc ``{"question", "choices": {"text",
                          "label"}, "answerKey"}``, or llm-foundry ``{"query", "choices", "gold"}``
``mmlu``           mc     CSV without header ``question, A, B, C, D, answer letter``; a CSV with
                          that header; or HF cais/mmlu ``{"question", "choices", "answer": int}``
``winogrande``     mc     ``{"sentence", "option1", "option2", "answer": "1"|"2"}``, or llm-foundry
                          ``{"context_options": [2], "continuation", "gold"}``
``gsm8k``          instr  ``{"question", "answer"}`` (the worked solution is the reply)
``cot-collection`` instr  ``{"source", "rationale", "target"}``; reply ``rationale\\n\\ntarget``
``openorca-mc``    instr  ``{"system_prompt", "question", "response"}``
``dolly``          instr  ``{"instruction", "context", "response"}`` (databricks-dolly-15k)
``firefly``        instr  ``{"input", "target"}`` (firefly-train-1.1M)
``gpt4all``        instr  ``{"prompt", "response"}`` (gpt4all prompt generations)
``cot``            instr  ``{"instruction", "input", "output"}`` (Alpaca-CoT)
``oig``            chat   ``{"text": "<human>: ...\\n<bot>: ..."}`` (LAION OIG), any number of turns
=================  =====  =====================================================================

The MC loaders also read the generic ``{"question", "choices", "gold"}`` records.

``columns:`` (LLaMA-Factory's ``dataset_info`` idea) maps raw column names for any other schema:
``{prompt, query, response, history, system}`` (query is appended to the prompt on a new line and
kept as the Alpaca ``input``; history is a list of ``[user, assistant]`` pairs before the prompt), or
``{messages, role_tag, content_tag, user_tag, assistant_tag, system_tag}`` for message lists.
A record without a mapped column raises ``ValueError`` naming the column; the reader adds ``file:line``.
A source with ``shape: instruction`` reads the mc loaders' records in the instruction shape (see
:func:`as_instruction`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from minima.core.errors import ConfigError
from minima.data.formats import CHOICE_LABELS, Message, mc_choices_text, mc_messages

ToMessages = Callable[[Any], list[Message]]


@dataclass(frozen=True)
class Loader:
    """A named raw schema: how one record becomes a conversation."""

    name: str
    shape: str  # "mc" or "instruction" (or "chat")
    to_messages: ToMessages
    csv_header: bool = True  # False: CSV rows are read as lists (MMLU's headerless files)


def _col(rec: Any, key: str) -> Any:
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object with a {key!r} column, got {type(rec).__name__}")
    if key not in rec or rec[key] is None:
        cols = ", ".join(sorted(map(str, rec))[:12])
        raise ValueError(f"missing column {key!r} (columns: {cols})")
    return rec[key]


def _str(rec: Any, key: str) -> str:
    value = _col(rec, key)
    if not isinstance(value, str):
        raise ValueError(f"column {key!r} must be a string, got {type(value).__name__}")
    return value


def _generic_mc(rec: Any) -> Optional[list[Message]]:
    generic = isinstance(rec, dict) and "gold" in rec and isinstance(rec.get("choices"), list)
    return mc_messages(rec) if generic and isinstance(rec.get("question"), str) else None


def _mc(question: str, choices: list, gold: int) -> list[Message]:
    return mc_messages({"question": question, "choices": [str(c) for c in choices], "gold": gold})


def _label_index(labels: list[str], key: Any) -> int:
    """Index of an answer key among the choice labels (A-E or 1-4); a bare letter or digit also works."""
    key = str(key).strip()
    if key in labels:
        return labels.index(key)
    if key.isdigit():
        return int(key) - 1
    if len(key) == 1 and key.upper() in CHOICE_LABELS:
        return CHOICE_LABELS.index(key.upper())
    raise ValueError(f"answerKey {key!r} is not one of the labels {labels}")


# ------------------------------------------------------------------------------------------ mc
def arc(rec: Any) -> list[Message]:
    """ARC in the AI2, HF or llm-foundry schema."""
    generic = _generic_mc(rec)
    if generic is not None:
        return generic
    if isinstance(rec, dict) and "query" in rec:  # llm-foundry
        query = _str(rec, "query").removeprefix("Question: ")
        return _mc(query, _col(rec, "choices"), int(_col(rec, "gold")))
    q = _col(rec, "question")
    if isinstance(q, dict):  # AI2 original: question.stem, question.choices
        stem, choices = _str(q, "stem"), _col(q, "choices")
        texts = [str(_col(c, "text")) for c in choices]
        labels = [str(_col(c, "label")) for c in choices]
    else:  # HF ai2_arc: question str, choices {text: [...], label: [...]}
        stem, choices = _str(rec, "question"), _col(rec, "choices")
        texts, labels = [str(t) for t in _col(choices, "text")], [str(x) for x in _col(choices, "label")]
    return _mc(stem, texts, _label_index(labels, _col(rec, "answerKey")))


def mmlu(rec: Any) -> list[Message]:
    """MMLU: a headerless CSV row ``question, A, B, C, D, answer``, a CSV row with that header, or HF."""
    if isinstance(rec, list):
        if len(rec) != 6:
            raise ValueError(f"an MMLU row has 6 fields (question, A, B, C, D, answer), got {len(rec)}")
        return _mc(rec[0], rec[1:5], _label_index(list("ABCD"), rec[5]))
    generic = _generic_mc(rec)
    if generic is not None:
        return generic
    if isinstance(rec, dict) and "choices" in rec:  # HF cais/mmlu
        return _mc(_str(rec, "question"), _col(rec, "choices"), _label_index(list("ABCD"), _col(rec, "answer")))
    return _mc(_str(rec, "question"), [_col(rec, k) for k in "ABCD"], _label_index(list("ABCD"), _col(rec, "answer")))


def _winogrande_messages(sentence: str, options: list[str], gold: int) -> list[Message]:
    return [
        {"role": "user", "content": sentence, "options": options},
        {"role": "assistant", "content": options[gold]},
    ]


def winogrande(rec: Any) -> list[Message]:
    """Winogrande: the original schema, or llm-foundry's (the blank is put back between the options' common
    prefix, cut at a space, and the continuation)."""
    if isinstance(rec, dict) and "context_options" in rec:
        a, b = (str(x) for x in _col(rec, "context_options"))
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        n = a.rfind(" ", 0, n) + 1 if " " in a[:n] else 0
        cont = _str(rec, "continuation")
        sep = "" if cont[:1] in ".,;:!?'’" else " "
        gold = int(_col(rec, "gold"))
        return _winogrande_messages(a[:n] + "_" + sep + cont, [a[n:], b[n:]], gold)
    options = [str(_col(rec, "option1")), str(_col(rec, "option2"))]
    answer = str(_col(rec, "answer")).strip()
    if answer not in ("1", "2"):
        raise ValueError(f"column 'answer' must be 1 or 2, got {answer!r}")
    return _winogrande_messages(_str(rec, "sentence"), options, int(answer) - 1)


# ------------------------------------------------------------------------------- instruction
def _instruction(user: str, reply: str, system: str = "", extra: str = "") -> list[Message]:
    msgs: list[Message] = [{"role": "system", "content": system}] if system else []
    content = user + ("\n" + extra if extra else "")
    return msgs + [
        {"role": "user", "content": content, **({"input": extra} if extra else {})},
        {"role": "assistant", "content": reply},
    ]


def gsm8k(rec: Any) -> list[Message]:
    return _instruction(_str(rec, "question"), _str(rec, "answer"))


def cot_collection(rec: Any) -> list[Message]:
    return _instruction(_str(rec, "source"), _str(rec, "rationale") + "\n\n" + _str(rec, "target"))


def openorca_mc(rec: Any) -> list[Message]:
    system = rec.get("system_prompt") if isinstance(rec, dict) else None
    return _instruction(_str(rec, "question"), _str(rec, "response"), system if isinstance(system, str) else "")


_OIG_TURN = re.compile(r"<(human|bot)>:\s?")


def oig(rec: Any) -> list[Message]:
    """LAION OIG: ``<human>: q\\n<bot>: a`` turns in one text column."""
    text = _str(rec, "text")
    parts = _OIG_TURN.split(text)
    if len(parts) < 5 or parts[1] != "human":
        raise ValueError("column 'text' must hold '<human>: ...' and '<bot>: ...' turns")
    roles = {"human": "user", "bot": "assistant"}
    return [{"role": roles[tag], "content": body.strip()} for tag, body in zip(parts[1::2], parts[2::2])]


def as_instruction(msgs: list[Message]) -> list[Message]:
    """An mc conversation in the instruction shape: the choices (or options) join the user text as
    ``(0): a (1): b``, after a blank line; the reply stays the answer text."""
    out = []
    for m in msgs:
        opts = m.get("choices") or m.get("options")
        if m.get("role") == "user" and opts:
            m = {"role": "user", "content": m["content"] + "\n\n" + mc_choices_text([str(c) for c in opts])}
        out.append(m)
    return out


# ----------------------------------------------------------------------------------- columns
PROMPT_KEYS = ("prompt", "query", "response", "history", "system")
MESSAGE_KEYS = ("messages", "role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag")


def check_columns(columns: dict[str, str], where: str) -> None:
    """ConfigError unless ``columns`` is a prompt/response mapping or a messages mapping."""
    keys = set(columns)
    bad = sorted(keys - set(PROMPT_KEYS) - set(MESSAGE_KEYS))
    if bad:
        raise ConfigError(
            f"unknown columns key(s): {', '.join(bad)}",
            where=where,
            fix=f"use {', '.join(PROMPT_KEYS)}, or {', '.join(MESSAGE_KEYS)}",
        )
    if "messages" in keys:
        if keys & {"prompt", "query", "response", "history"}:
            raise ConfigError(
                "columns maps either messages or prompt/response, not both", where=where, fix="keep one of them"
            )
    elif not {"prompt", "response"} <= keys:
        raise ConfigError(
            "columns needs prompt and response (or messages)",
            where=where,
            fix="e.g. columns={prompt: instruction, query: input, response: output}",
        )


def columns_loader(columns: dict[str, str]) -> ToMessages:
    """A record -> conversation function for a ``columns:`` mapping (checked by :func:`check_columns`)."""
    if "messages" in columns:
        role, content = columns.get("role_tag", "role"), columns.get("content_tag", "content")
        tags = {
            columns.get("user_tag", "user"): "user",
            columns.get("assistant_tag", "assistant"): "assistant",
            columns.get("system_tag", "system"): "system",
        }

        def messages(rec: Any) -> list[Message]:
            items = _col(rec, columns["messages"])
            if not isinstance(items, list):
                raise ValueError(f"column {columns['messages']!r} must be a list of messages")
            out = []
            for i, m in enumerate(items):
                r = _col(m, role) if isinstance(m, dict) else None
                if str(r) not in tags:
                    raise ValueError(
                        f"message {i}: {role}={r!r} is none of {sorted(tags)} (set user_tag/assistant_tag)"
                    )
                out.append({"role": tags[str(r)], "content": str(_col(m, content))})
            system_col = columns.get("system")
            if system_col and isinstance(rec.get(system_col), str) and rec[system_col]:
                out.insert(0, {"role": "system", "content": rec[system_col]})
            return out

        return messages

    def prompt_response(rec: Any) -> list[Message]:
        extra = _col(rec, columns["query"]) if "query" in columns else ""
        system = _col(rec, columns["system"]) if "system" in columns else ""
        msgs: list[Message] = [{"role": "system", "content": str(system)}] if system else []
        if "history" in columns:
            history = _col(rec, columns["history"])
            if not isinstance(history, list):
                raise ValueError(f"column {columns['history']!r} must be a list of [user, assistant] pairs")
            for i, pair in enumerate(history):
                if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                    raise ValueError(f"column {columns['history']!r}: item {i} is not a [user, assistant] pair")
                msgs += [{"role": "user", "content": str(pair[0])}, {"role": "assistant", "content": str(pair[1])}]
        tail = _instruction(_str(rec, columns["prompt"]), _str(rec, columns["response"]), extra=str(extra or ""))
        return msgs + tail

    return prompt_response


# ---------------------------------------------------------------------------------- registry
def _columns(**mapping: str) -> ToMessages:
    return columns_loader(mapping)


LOADERS: dict[str, Loader] = {
    x.name: x
    for x in (
        Loader("arc", "mc", arc),
        Loader("mmlu", "mc", mmlu, csv_header=False),
        Loader("winogrande", "mc", winogrande),
        Loader("gsm8k", "instruction", gsm8k),
        Loader("cot-collection", "instruction", cot_collection),
        Loader("openorca-mc", "instruction", openorca_mc),
        Loader("dolly", "instruction", _columns(prompt="instruction", query="context", response="response")),
        Loader("firefly", "instruction", _columns(prompt="input", response="target")),
        Loader("gpt4all", "instruction", _columns(prompt="prompt", response="response")),
        Loader("cot", "instruction", _columns(prompt="instruction", query="input", response="output")),
        Loader("oig", "chat", oig),
    )
}


def loader_named(name: str) -> Optional[Loader]:
    """The loader a source name selects: an exact loader name, else the longest ``<loader>-``/``<loader>_``
    prefix; None when the name is no loader's."""
    if name in LOADERS:
        return LOADERS[name]
    hits = [k for k in LOADERS if name.startswith((k + "-", k + "_"))]
    return LOADERS[max(hits, key=len)] if hits else None


def source_loader(name: str, loader: Optional[str], columns: Optional[dict[str, str]], where: str) -> Optional[Loader]:
    """The loader of a source: its ``columns`` mapping, its ``loader``, or the one its name selects."""
    if columns:
        if loader:
            raise ConfigError("give a source loader or columns, not both", where=where, fix="drop one of them")
        check_columns(columns, where)
        return Loader(f"columns:{name}", "instruction", columns_loader(dict(columns)))
    if loader == "none":  # a source whose name is a loader's but whose records are already conversations
        return None
    if loader:
        if loader not in LOADERS:
            raise ConfigError(
                f"unknown loader {loader!r}",
                where=where,
                fix=f"use one of {', '.join(sorted(LOADERS))}, none, or columns",
            )
        return LOADERS[loader]
    return loader_named(name)
