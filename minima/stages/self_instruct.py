"""``minima self-instruct``: bootstrap instruction data from an OpenAI-compatible endpoint.

The Self-Instruct / Stanford Alpaca recipe, in English and Chinese: each request shows the model
``num_prompt_instructions`` tasks sampled from the seed tasks and from tasks it already wrote, and
asks it to continue a numbered list of ``tasks_per_request`` new ones. The reply is parsed into
instruction/input/output and filtered:

- length limits (words; each CJK character counts as one word);
- a blacklist of things a text model cannot do (images, files, audio, ...);
- ROUGE-L similarity against the pool (seeds + accepted tasks) above ``similarity_threshold``
  (0.7), with a tokenizer that keeps CJK characters, so Chinese near-duplicates are caught too.

Accepted tasks are appended to ``<out>.accepted.jsonl`` as soon as they pass (one fsync'd line
each), so a killed run loses nothing it accepted; rerunning with the same ``out`` continues to
``num_instructions_to_generate``. At the end ``out`` is written as an Alpaca JSON list
(``instruction``/``input``/``output``) that the records and sft stages read as it is. Rejections go
to ``<out>.rejected.jsonl`` with their reason, counts to ``<out>.stats.json``.

Usage::

    export OPENAI_API_KEY=...   # only if the endpoint wants one
    minima self-instruct base_url=http://127.0.0.1:8000/v1 model=NAME out=data/si.json \\
        num_instructions_to_generate=1000 concurrency=8
"""

from __future__ import annotations

import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator

from minima.core.config import Closed, command_config
from minima.core.errors import ConfigError, DataError, InputError
from minima.core.io import Journal, read_journal, read_rows, str_list, write_json_atomic
from minima.core.logs import get_logger
from minima.infer.api_client import Client, Reply

log = get_logger("minima.stages.self_instruct")

_SHARED = Path(os.environ.get("MINIMA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DEFAULT_SEEDS = (
    _SHARED / "instruction" / "alpaca_seed_tasks.jsonl",
    _SHARED / "instruction" / "belle_zh_seed_tasks.jsonl",
)

BLACKLIST_EN = (
    "image",
    "images",
    "picture",
    "pictures",
    "photo",
    "photos",
    "photograph",
    "graph",
    "graphs",
    "chart",
    "diagram",
    "flowchart",
    "draw",
    "drawing",
    "sketch",
    "plot",
    "video",
    "videos",
    "audio",
    "sound",
    "music",
    "file",
    "files",
    "attachment",
    "attached",
    "map",
    "maps",
    "link",
    "url",
    "website",
    "go to",
    "screenshot",
)
BLACKLIST_ZH = (
    "图片",
    "图像",
    "照片",
    "图表",
    "示意图",
    "流程图",
    "画一",
    "画出",
    "绘制",
    "视频",
    "音频",
    "音乐",
    "录音",
    "文件",
    "附件",
    "链接",
    "网址",
    "网站",
    "地图",
    "截图",
)


class SelfInstructConfig(Closed):
    """Settings of ``minima self-instruct`` (key=value). The API key is read from ``api_key_env``."""

    base_url: Optional[str] = Field(
        None, description="Endpoint root, e.g. http://127.0.0.1:8000/v1 (default: env OPENAI_BASE_URL)."
    )
    model: Optional[str] = Field(None, description="Model id the endpoint serves.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (unset: no key).")
    api: Literal["chat", "completions"] = Field(
        "chat", description="Send the prompt as one chat user message, or as a raw completion prompt."
    )
    seed_tasks: list[str] = Field(
        default_factory=list,
        description="Seed task files: Alpaca/BELLE seed JSONL or Alpaca JSON "
        "(default: the English and Chinese seeds in ../shared/data/instruction).",
    )
    language: Literal["auto", "en", "zh"] = Field(
        "auto", description="auto: prompts in every language the seeds have, in turn; en/zh: that language only."
    )
    out: str = Field(
        "self_instruct.json", description="Output Alpaca JSON; <out stem>.accepted.jsonl is the resumable journal."
    )
    num_instructions_to_generate: int = Field(
        100, ge=1, description="Target number of accepted tasks (counting earlier runs)."
    )
    num_prompt_instructions: int = Field(3, ge=1, description="Example tasks shown per request.")
    num_machine_instructions: int = Field(
        1, ge=0, description="How many of the examples come from generated tasks (once there are some)."
    )
    tasks_per_request: int = Field(20, ge=1, description="Tasks asked for per request (the numbered list length).")
    temperature: float = Field(1.0, ge=0, le=2, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(
        3072, ge=16, description="Reply token limit; a reply cut by it loses its last (partial) task."
    )
    concurrency: int = Field(4, ge=1, description="Requests in flight at once.")
    max_requests: Optional[int] = Field(
        None, ge=1, description="Give up after this many requests in this run (default: 10 + 5x the minimum needed)."
    )
    max_retries: int = Field(6, ge=0, description="Retries per request on 429/5xx/network errors.")
    backoff: float = Field(2.0, ge=0, description="First retry wait in seconds (doubles per retry, with jitter).")
    timeout: float = Field(600.0, gt=0, description="Seconds per request.")
    similarity_threshold: float = Field(
        0.7, ge=0, le=1, description="Reject a task whose ROUGE-L F1 against any pool task is above this."
    )
    min_instruction_words: int = Field(
        3, ge=1, description="Shortest instruction (words; a CJK character is one word)."
    )
    max_instruction_words: int = Field(150, ge=1, description="Longest instruction.")
    max_input_words: int = Field(600, ge=1, description="Longest input.")
    max_output_words: int = Field(1200, ge=1, description="Longest output.")
    blacklist: Optional[list[str]] = Field(
        None, description="Words that reject a task (default: image/file/audio/... in English and Chinese)."
    )
    seed: int = Field(0, description="Seed for sampling the prompt examples.")

    _lists = field_validator("seed_tasks", "blacklist", mode="before")(lambda v: str_list(v))


# ------------------------------------------------------------------------------ ROUGE-L
_TOKEN = re.compile(r"[a-z0-9]+|[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]")


def tokenize(text: str) -> list[str]:
    """ROUGE tokens: lowercase ASCII words and numbers (as rouge-score) plus each CJK character."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence, bit-parallel over ``a`` (Hyyrö 2004)."""
    if not a or not b:
        return 0
    masks: dict = {}
    for i, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full  # zero bits of v mark LCS increments
    for y in b:
        m = masks.get(y)
        if m:
            u = v & m
            v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(a: list, b: list) -> float:
    """ROUGE-L F1 of two token lists (symmetric)."""
    lcs = lcs_length(a, b)
    return 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(b))


class SimilarityPool:
    """Token lists of all tasks so far; :meth:`most_similar` is a max ROUGE-L F1 search."""

    def __init__(self):
        self.texts: list[str] = []
        self.tokens: list[list[str]] = []

    def add(self, text: str) -> None:
        self.texts.append(text)
        self.tokens.append(tokenize(text))

    def most_similar(self, text: str, threshold: float = 1.0) -> tuple[float, Optional[str]]:
        """``(best F1, its text)``; pairs whose lengths alone rule out F1 > ``threshold`` are skipped."""
        toks = tokenize(text)
        best, best_text = 0.0, None
        la = len(toks)
        for other, ob in zip(self.texts, self.tokens):
            lb = len(ob)
            if la + lb == 0 or 2 * min(la, lb) / (la + lb) <= min(threshold, best):
                continue  # F1 <= 2*min/(la+lb): cannot beat what we have or cross the threshold
            f = rouge_l(toks, ob)
            if f > best:
                best, best_text = f, other
        return best, best_text


# ------------------------------------------------------------------------------ seeds
def language_of(text: str) -> str:
    """``zh`` when CJK characters make up over 30% of the letters, else ``en``."""
    cjk = len(_CJK.findall(text))
    latin = len(re.findall(r"[A-Za-z]", text))
    return "zh" if cjk and cjk >= 0.3 * (cjk + latin / 4) else "en"


def load_seed_tasks(paths: Iterable[str | Path]) -> list[dict]:
    """Tasks ``{instruction, input, output, lang}`` from Alpaca/BELLE seed JSONL or Alpaca JSON files."""
    tasks = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise InputError(
                f"seed task file not found: {p}", where="seed_tasks", fix="pass seed_tasks=[a.jsonl, b.json]"
            )
        rows = read_rows(p, kind="json")  # a JSON array or JSON Lines, whatever the suffix
        for n, r in rows:
            if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
                raise DataError(
                    "a seed task needs an 'instruction' string",
                    where=f"{p}:{n}",
                    fix="use Alpaca seed_tasks.jsonl rows or {instruction, input, output} records",
                )
            inst = (r.get("instances") or [{}])[0] if "instances" in r else r
            tasks.append(
                {
                    "instruction": r["instruction"].strip(),
                    "input": str(inst.get("input") or "").strip(),
                    "output": str(inst.get("output") or "").strip(),
                    "lang": language_of(r["instruction"]),
                }
            )
    if not tasks:
        raise InputError("no seed tasks", where="seed_tasks", fix="pass seed_tasks= files holding some tasks")
    return tasks


# ------------------------------------------------------------------------------ prompts
_PROMPTS = {
    "en": (
        "We are building a varied collection of tasks to teach an AI assistant. Continue the numbered list below "
        "with new tasks until there are {total} in all. Each new task must differ from the examples and from the "
        "other new tasks.\n\n"
        "Guidelines:\n"
        "- Mix the kinds of task: questions, advice, classification, rewriting, summarising, extraction, "
        "brainstorming, reasoning, math, code and so on.\n"
        "- Vary the wording; do not start every instruction with the same verb.\n"
        "- Every task must be doable with text alone: no images, audio, video, files, web links, or actions in the "
        "physical world.\n"
        "- Write the instructions in English, one or two sentences each; some are questions, some are requests.\n"
        "- Give an input only when the task needs material to work on (a passage, a list, a table, some code), and "
        "make it concrete and complete. Otherwise write <noinput>.\n"
        "- The output is a good answer to the task: complete, but not padded.\n\n"
        "Use exactly this format for every task, with a line of ### after each:\n"
        "N. Instruction: ...\nN. Input:\n...\nN. Output:\n...\n###\n\n"
    ),
    "zh": (
        "我们正在为一个AI助手编写多样化的训练任务。请接着下面的编号列表继续写新任务，直到总共有{total}个。"
        "每个新任务都要与示例不同，新任务之间也不能重复。\n\n"
        "要求：\n"
        "- 任务类型要多样：问答、建议、分类、改写、摘要、信息抽取、头脑风暴、推理、数学、代码等。\n"
        "- 用词要有变化，不要每条指令都用同一个动词开头。\n"
        "- 任务必须只靠文字就能完成：不涉及图片、音频、视频、文件、网页链接，也不要求在现实世界中采取行动。\n"
        "- 指令用中文书写，每条一到两句话，可以是问题，也可以是要求。\n"
        "- 只有任务需要处理具体材料（一段文字、一个列表、一张表格、一段代码）时才写输入，"
        "输入要具体、完整；否则写<无输入>。\n"
        "- 输出是对任务的优质回答，完整但不啰嗦。\n\n"
        "每个任务都严格使用以下格式，并在每个任务后另起一行写###：\n"
        "N. 指令：...\nN. 输入：\n...\nN. 输出：\n...\n###\n\n"
    ),
}
_LABELS = {
    "en": ("Instruction", "Input", "Output", "<noinput>", ": "),
    "zh": ("指令", "输入", "输出", "<无输入>", "："),
}


def build_prompt(examples: list[dict], lang: str, tasks_per_request: int) -> str:
    """The request text: our instructions, the examples as items 1..k, then ``k+1. Instruction:``."""
    ins, inp, out, none, colon = _LABELS[lang]
    k = len(examples)
    parts = [_PROMPTS[lang].format(total=k + tasks_per_request)]
    for i, t in enumerate(examples, 1):
        parts.append(
            f"{i}. {ins}{colon}{t['instruction']}\n{i}. {inp}{colon.rstrip()}\n{t['input'] or none}\n"
            f"{i}. {out}{colon.rstrip()}\n{t['output']}\n###\n"
        )
    parts.append(f"{k + 1}. {ins}{colon.rstrip()}")
    return "".join(parts)


# ------------------------------------------------------------------------------ parsing
_LABEL = re.compile(
    r"^[ \t*#]*(?:(\d+)[ \t]*[.)、．][ \t]*)?\**(instruction|input|output|指令|输入|输出)\**[ \t]*[:：]", re.I | re.M
)
_KIND = {
    "instruction": "instruction",
    "指令": "instruction",
    "input": "input",
    "输入": "input",
    "output": "output",
    "输出": "output",
}
_NO_INPUT = {"<noinput>", "<no input>", "noinput", "no input", "none", "n/a", "<无输入>", "无输入", "无", "<无>", "空"}
_SEPARATOR = re.compile(r"^\s*#{3,}\s*$", re.M)


def parse_tasks(text: str, truncated: bool = False, first_number: Optional[int] = None) -> list[dict]:
    """Tasks ``{instruction, input, output}`` from a numbered reply.

    Args:
        text: the model's reply. If it does not start with an instruction label (a completion that
            continues ``k+1. Instruction:``), one is assumed at the start.
        truncated: the reply hit the token limit; its last task is dropped as possibly cut.
        first_number: the number of the first task, used for the assumed label.
    """
    head = _LABEL.match(text.lstrip())
    if not head or _KIND[head.group(2).lower()] != "instruction":
        text = f"{first_number or 1}. Instruction: " + text
    marks = list(_LABEL.finditer(text))
    tasks: list[dict] = []
    cur: Optional[dict] = None
    for j, m in enumerate(marks):
        end = marks[j + 1].start() if j + 1 < len(marks) else len(text)
        value = text[m.end() : end]
        sep = _SEPARATOR.search(value)
        if sep:
            value = value[: sep.start()]  # anything after ### is chatter between tasks
        value = value.strip()
        kind = _KIND[m.group(2).lower()]
        if kind == "instruction":
            cur = {"instruction": value}
            tasks.append(cur)
        elif cur is not None and kind not in cur:
            cur[kind] = value
    if truncated and tasks:
        tasks.pop()
    out = []
    for t in tasks:
        inp = t.get("input", "")
        if inp.strip().lower() in _NO_INPUT:
            inp = ""
        out.append({"instruction": t["instruction"], "input": inp, "output": t.get("output", "")})
    return out


# ------------------------------------------------------------------------------ filters
class TaskFilter:
    """The acceptance rules; :meth:`check` returns a rejection reason or None and grows the pool."""

    def __init__(self, cfg: SelfInstructConfig, pool_texts: Iterable[str]):
        self.cfg = cfg
        self.pool = SimilarityPool()
        self.seen: set[str] = set()
        for t in pool_texts:
            self._remember(t)
        words = cfg.blacklist if cfg.blacklist is not None else list(BLACKLIST_EN) + list(BLACKLIST_ZH)
        latin = [w for w in words if not _CJK.search(w)]
        self.black_latin = (
            re.compile(r"\b(?:" + "|".join(re.escape(w) for w in latin) + r")\b", re.I) if latin else None
        )
        self.black_cjk = [w for w in words if _CJK.search(w)]

    @staticmethod
    def _key(text: str) -> str:
        return " ".join(text.lower().split())

    def _remember(self, text: str) -> None:
        self.seen.add(self._key(text))
        self.pool.add(text)

    def check(self, task: dict) -> tuple[Optional[str], dict]:
        """``(reason or None, details)``; an accepted task joins the pool."""
        c = self.cfg
        inst, inp, out = task["instruction"], task["input"], task["output"]
        if not inst or not out:
            return "empty", {}
        n_inst = len(tokenize(inst))
        if not c.min_instruction_words <= n_inst <= c.max_instruction_words:
            return "length", {"instruction_words": n_inst}
        if len(tokenize(inp)) > c.max_input_words or len(tokenize(out)) > c.max_output_words:
            return "length", {"input_words": len(tokenize(inp)), "output_words": len(tokenize(out))}
        hit = self.black_latin.search(inst) if self.black_latin else None
        word = hit.group(0) if hit else next((w for w in self.black_cjk if w in inst), None)
        if word:
            return "blacklist", {"word": word}
        if not (inst[0].isalnum() or _CJK.match(inst[0]) or inst[0] in "\"'“‘《(（"):
            return "format", {}
        if self._key(inst) in self.seen:
            return "duplicate", {}
        score, similar = self.pool.most_similar(inst, c.similarity_threshold)
        if score > c.similarity_threshold:
            return "similar", {"rouge_l": round(score, 4), "similar_to": similar}
        self._remember(inst)
        return None, {"rouge_l": round(score, 4), "similar_to": similar}


# ------------------------------------------------------------------------------ journal
def _paths(out: Path) -> dict[str, Path]:
    stem = out.with_suffix("") if out.suffix else out
    return {
        "accepted": Path(f"{stem}.accepted.jsonl"),
        "rejected": Path(f"{stem}.rejected.jsonl"),
        "stats": Path(f"{stem}.stats.json"),
    }


# ------------------------------------------------------------------------------ the loop
@dataclass
class Result:
    """What a run did: accepted so far (all runs), requests this run, rejection counts, complete or not."""

    accepted: int
    target: int
    requests: int
    rejected: dict
    complete: bool
    out: Path


Generate = Callable[[str, str], Reply]  # (prompt, lang) -> reply


def endpoint_generator(cfg: SelfInstructConfig) -> Generate:
    """The default generation step: one request to the configured endpoint."""
    client = Client.from_env(
        cfg.base_url, cfg.model, cfg.api_key_env, timeout=cfg.timeout, max_retries=cfg.max_retries, backoff=cfg.backoff
    )
    k = cfg.num_prompt_instructions
    end = k + cfg.tasks_per_request + 1
    stop = [f"{end}. Instruction", f"{end}. 指令"]
    params = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens, stop=stop)

    def generate(prompt: str, lang: str) -> Reply:
        if cfg.api == "chat":
            return client.chat([{"role": "user", "content": prompt}], **params)
        return client.complete(prompt, **params)

    return generate


def run_self_instruct(cfg: SelfInstructConfig, generate: Optional[Generate] = None) -> Result:
    """Generate until ``num_instructions_to_generate`` tasks are accepted (or ``max_requests`` are spent).

    Args:
        cfg: the settings.
        generate: ``(prompt, lang) -> Reply``; default: requests to ``cfg.base_url``.
    """
    seeds = load_seed_tasks(cfg.seed_tasks or _default_seeds())
    langs = sorted({t["lang"] for t in seeds}) if cfg.language == "auto" else [cfg.language]
    by_lang = {lang: [t for t in seeds if t["lang"] == lang] for lang in langs}
    if any(not v for v in by_lang.values()):
        raise ConfigError(
            f"no {cfg.language} seed tasks in {cfg.seed_tasks or 'the default seeds'}",
            where="language",
            fix="pass seed tasks in that language or language=auto",
        )
    out = Path(cfg.out)
    paths = _paths(out)
    accepted = read_journal(paths["accepted"])
    filt = TaskFilter(cfg, [t["instruction"] for t in seeds] + [t["instruction"] for t in accepted])
    machine = {lang: [t for t in accepted if t.get("lang") == lang] for lang in langs}
    stats = {"requests": 0, "parsed": 0, "accepted": 0, "rejected": {}}
    remaining = cfg.num_instructions_to_generate - len(accepted)
    budget = cfg.max_requests or 10 + 5 * -(-max(remaining, 0) // cfg.tasks_per_request)
    if remaining > 0:
        log.info(
            "self-instruct: %d accepted so far, %d to go, up to %d requests, %d in flight",
            len(accepted),
            remaining,
            budget,
            cfg.concurrency,
        )
    generate = generate or endpoint_generator(cfg)
    rng = random.Random(f"{cfg.seed}:{len(accepted)}")  # a resumed run draws fresh prompts
    k = cfg.num_prompt_instructions
    acc_log, rej_log = Journal(paths["accepted"]), Journal(paths["rejected"])
    sent = 0
    t0 = time.time()
    error: Optional[BaseException] = None
    try:
        with ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="self-instruct") as pool:
            inflight: dict[Future, str] = {}
            while len(accepted) < cfg.num_instructions_to_generate:
                while error is None and len(inflight) < cfg.concurrency and sent < budget:
                    lang = langs[sent % len(langs)]
                    n_machine = min(cfg.num_machine_instructions, len(machine[lang]), k)
                    examples = rng.sample(machine[lang], n_machine) + rng.sample(
                        by_lang[lang], min(k - n_machine, len(by_lang[lang]))
                    )
                    rng.shuffle(examples)
                    prompt = build_prompt(examples, lang, cfg.tasks_per_request)
                    inflight[pool.submit(generate, prompt, lang)] = lang
                    sent += 1
                if not inflight:
                    break
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for fut in done:
                    lang = inflight.pop(fut)
                    try:
                        reply = fut.result()
                    except BaseException as e:
                        error = error or e
                        continue
                    stats["requests"] += 1
                    tasks = parse_tasks(reply.text, truncated=reply.finish_reason == "length", first_number=k + 1)
                    stats["parsed"] += len(tasks)
                    if not tasks:
                        _count(stats, "unparsed")
                        rej_log.write(
                            {"reason": "unparsed", "raw": reply.text[:4000], "finish_reason": reply.finish_reason}
                        )
                    for task in tasks:
                        if len(accepted) >= cfg.num_instructions_to_generate:
                            break
                        reason, info = filt.check(task)
                        if reason:
                            _count(stats, reason)
                            rej_log.write(dict(task, reason=reason, **info))
                            continue
                        row = dict(task, lang=language_of(task["instruction"]), **info)
                        acc_log.write(row)
                        accepted.append(row)
                        machine.setdefault(row["lang"], []).append(row)
                        stats["accepted"] += 1
                log.info(
                    "self-instruct: %d/%d accepted | %d requests | %.0f s | rejected %s",
                    len(accepted),
                    cfg.num_instructions_to_generate,
                    stats["requests"],
                    time.time() - t0,
                    stats["rejected"] or "-",
                )
            for fut in inflight:
                fut.cancel()
    finally:
        acc_log.close()
        rej_log.close()
    if error is not None:
        raise error
    final = accepted[: cfg.num_instructions_to_generate]
    write_json_atomic(
        out, [{"instruction": t["instruction"], "input": t["input"], "output": t["output"]} for t in final]
    )
    complete = len(final) >= cfg.num_instructions_to_generate
    write_json_atomic(
        paths["stats"],
        dict(stats, total_accepted=len(final), target=cfg.num_instructions_to_generate, complete=complete),
    )
    return Result(len(final), cfg.num_instructions_to_generate, stats["requests"], stats["rejected"], complete, out)


def _count(stats: dict, reason: str) -> None:
    stats["rejected"][reason] = stats["rejected"].get(reason, 0) + 1


def _default_seeds() -> list[str]:
    found = [str(p) for p in DEFAULT_SEEDS if p.is_file()]
    if not found:
        raise ConfigError(
            "no seed tasks given and the default seeds are absent",
            where="seed_tasks",
            fix=f"pass seed_tasks=[file.jsonl, ...] (defaults: {', '.join(str(p) for p in DEFAULT_SEEDS)})",
        )
    return found


def main(argv: Optional[list[str]] = None) -> int:
    """``minima self-instruct [--config F] key=value ...``; exit 1 when the target was not reached."""
    cfg = command_config(SelfInstructConfig, argv, __doc__)
    if cfg is None:
        return 0
    res = run_self_instruct(cfg)
    print(
        f"self-instruct: {res.accepted}/{res.target} tasks -> {res.out} "
        f"({res.requests} requests this run; rejected {res.rejected or 'none'})"
    )
    if not res.complete:
        print(
            f"self-instruct: stopped before the target: rerun to continue (max_requests={cfg.max_requests or 'auto'})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
