"""``minima chat model=DIR``: an interactive terminal chat using the model's chat template."""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import Optional

from minima.core.config import key_values
from minima.core.errors import InputError


@lru_cache(maxsize=2)
def _load(model_dir: str):
    from pathlib import Path

    from minima.models.loader import load_model, load_tokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise InputError(
            f"no model at {model_dir} (config.json missing)", fix="pass model=DIR of an HF model directory"
        )
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, dtype="saved", device="cpu", family="causal")
    return tok, model


def prompt_ids(tok, messages: list[dict]) -> list[int]:
    """Token ids of the conversation so far plus the assistant prefix."""
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
    # No template (a base model): a plain MiniChat-style prompt.
    text = "".join(
        f"[|{'User' if m['role'] == 'user' else 'Assistant'}|] {m['content']}"
        + ("" if m["role"] == "user" else tok.eos_token)
        for m in messages
    )
    return tok(text + "[|Assistant|]").input_ids


def generate_reply(model_dir: str, messages: list[dict], max_new_tokens: int = 128, temperature: float = 0.0) -> str:
    import torch

    tok, model = _load(str(model_dir))
    ids = torch.tensor([prompt_ids(tok, messages)])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=None,
            top_k=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id or tok.eos_token_id,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main(argv: Optional[list[str]] = None) -> int:
    args = key_values(argv, ("model", "system", "max_new_tokens", "temperature"))
    if "model" not in args:
        raise InputError("minima chat needs model=DIR", fix="e.g. minima chat model=runs/demo/06_sft")
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
        reply = generate_reply(
            args["model"], messages, int(args.get("max_new_tokens", 128)), float(args.get("temperature", 0))
        )
        messages.append({"role": "assistant", "content": reply})
        print(f"bot> {reply}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
