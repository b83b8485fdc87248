"""``minima chat model=DIR``: an interactive terminal chat, and chat replies for programs.

Prompts use the model's chat template (the minichat format when the tokenizer has none) and replies
come from :class:`minima.infer.engine.Engine`: streamed to the terminal token by token, or, for
:func:`generate_replies`, decoded for several conversations at once as one batch.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import Optional

from minima.core.config import key_values
from minima.core.errors import InputError
from minima.infer.engine import Engine, SamplingParams


@lru_cache(maxsize=2)
def _engine(model_dir: str) -> Engine:
    return Engine.from_dir(model_dir)


def _params(engine: Engine, prompt: list[int], max_new_tokens: int, temperature: float) -> SamplingParams:
    room = engine.context_length - len(prompt)
    if room < 1:
        raise InputError(
            f"the conversation ({len(prompt)} tokens) fills the model's context of {engine.context_length}",
            fix="start over (/reset) or use a shorter message",
        )
    return SamplingParams(
        max_new_tokens=min(max_new_tokens, room), temperature=temperature, seed=None if temperature > 0 else 0
    )


def generate_replies(
    model_dir: str, conversations: list[list[dict]], max_new_tokens: int = 128, temperature: float = 0.0
) -> list[str]:
    """The assistant's next reply to each conversation, decoded together (whitespace stripped)."""
    engine = _engine(str(model_dir))
    prompts = [engine.chat_ids(messages) for messages in conversations]
    params = [_params(engine, p, max_new_tokens, temperature) for p in prompts]
    return [out[0].text.strip() for out in engine.generate(prompts, params)]


def generate_reply(model_dir: str, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0) -> str:
    """The assistant's next reply to one conversation (greedy at temperature 0)."""
    return generate_replies(model_dir, [messages], max_new_tokens, temperature)[0]


def main(argv: Optional[list[str]] = None) -> int:
    """``minima chat model=DIR [system=...] [max_new_tokens=128] [temperature=0]``."""
    args = key_values(argv, ("model", "system", "max_new_tokens", "temperature"))
    if "model" not in args:
        raise InputError("minima chat needs model=DIR", fix="e.g. minima chat model=runs/demo/06_sft")
    engine = _engine(args["model"])
    max_new, temperature = int(args.get("max_new_tokens", 128)), float(args.get("temperature", 0))
    messages: list[dict] = []
    if args.get("system"):
        messages.append({"role": "system", "content": args["system"]})
    print("minima chat: empty line or Ctrl-D to quit, /reset to start over")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            messages = messages[:1] if messages and messages[0]["role"] == "system" else []
            continue
        messages.append({"role": "user", "content": line})
        prompt = engine.chat_ids(messages)
        print("bot> ", end="", flush=True)
        reply = ""
        for event in engine.stream(prompt, _params(engine, prompt, max_new, temperature)):
            delta = event.text if reply else event.text.lstrip()  # the reply starts at its first word
            reply += delta
            print(delta, end="", flush=True)
        print(flush=True)
        messages.append({"role": "assistant", "content": reply.strip()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
