"""Preference pairs from the demo world (:mod:`minima.data.demo`) for the dpo stage.

Each pair asks a fact's question; the chosen reply is the fact's chat reply and the rejected one the
same reply with a wrong answer from the fact's own pool (a fluent wrong fact): "Paris." against
"Rome.", "3 plus 5 equals 8." against "3 plus 5 equals 9.". Pairs are written in the
``{"prompt", "chosen", "rejected"}`` shape that ``minima records format=preference`` reads, with
``lang``, ``kind`` and ``key`` beside them.

The facts split as the demo corpus splits them: ``train`` facts are those the demo chat data teaches,
``held_out`` those only the pretraining text states (the demo_mc test questions).
Same seed -> same pairs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from minima.core.artifacts import atomic_write_text
from minima.data.demo import Fact, facts


def held_out_facts(seed: int = 0) -> set[int]:
    """Indices into :func:`minima.data.demo.facts` of the held-out facts (the demo corpus's first draw)."""
    rng = random.Random(seed)
    order = list(range(len(facts())))
    rng.shuffle(order)
    return set(order[: len(order) // 4])


def wrong_answer(fact: Fact, lang: str, rng: random.Random) -> str:
    """The fact's chat reply with a wrong answer from its pool in place of the right one."""
    answer = fact.answer(lang)
    pool = sorted(set(fact.pool_en if lang == "en" else fact.pool_zh) - {answer})
    reply = fact.reply(lang)
    at = reply.rfind(answer)  # the answer ends the reply ("3 plus 5 equals 8.", "Paris.")
    return reply[:at] + rng.choice(pool) + reply[at + len(answer) :]


def preference_pairs(
    seed: int = 0, split: str = "all", per_fact: int = 1, langs: tuple[str, ...] = ("en", "zh")
) -> list[dict]:
    """Preference pairs of the demo world's facts.

    Args:
        seed: the demo corpus's seed (which facts are held out) and the draw of the wrong answers.
        split: ``train`` (facts the demo chat data teaches), ``held_out`` or ``all``.
        per_fact: pairs per fact and language, each with another wrong answer when the pool allows.
        langs: ``en`` and/or ``zh``.
    """
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split={split!r}: use train, held_out or all")
    held = held_out_facts(seed)
    rng = random.Random(f"{seed}-preference")
    out = []
    for i, f in enumerate(facts()):
        if (split == "train" and i in held) or (split == "held_out" and i not in held):
            continue
        for lang in langs:
            q, a = f.question(lang), f.reply(lang)
            seen: set[str] = set()
            for _ in range(per_fact):
                bad = wrong_answer(f, lang, rng)
                if bad in seen:
                    continue
                seen.add(bad)
                out.append({"prompt": q, "chosen": a, "rejected": bad, "lang": lang, "kind": f.kind, "key": f.key})
    return out


def write_preference_pairs(out_dir: str | Path, seed: int = 0, per_fact: int = 2) -> dict[str, Path]:
    """``preference/train.jsonl`` and ``preference/held_out.jsonl`` under ``out_dir``; returns the paths."""
    out = Path(out_dir) / "preference"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", per_fact), ("held_out", 1)):
        p = out / f"{split}.jsonl"
        rows = preference_pairs(seed, split, n)
        atomic_write_text(p, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        paths[split] = p
    return paths
