"""Built-in bilingual demo data, generated deterministically (no download, no ../shared needed).

The corpus is a small templated world, English and Chinese, that a tiny model learns in minutes:
capitals of countries, colours of things, word translations and one-digit arithmetic. Its facts are
split 75/25 into chat-train and held-out facts. From it come

- pretraining text (one document per line, ``text/pretrain_en.txt`` and ``text/pretrain_zh.txt``):
  every fact stated in several paraphrases, and, about the chat-train facts only, some QA text: QA lines
  (``Question: .. Answer: ..``) and chat transcripts in MiniChat's turn tags,
- a held-out text split drawn the same way that no stage trains on (``heldout/heldout_{en,zh}.txt``, its
  documents as one running text), for perplexity,
- chat conversations in the MiniChat JSON shape (``chat/demo_chat.json``: a list of conversations,
  each a list of ``{"User": .., "Assistant": ..}`` turns) about the chat-train facts,
- multiple-choice questions with gold answers (``eval/demo_mc/{dev,test}.jsonl``: question, the
  answer sentence's ``prefix`` up to the answer, choices, gold) and free-answer questions
  (``eval/demo_qa/{dev,test}.jsonl``: question, gold answer, reference reply), the test split asked
  about held-out facts: their statements are in the pretraining text, but no question about them is
  ever trained on, so answering them needs knowledge the model can extract, not a memorised reply,
- two SentencePiece models trained on the corpus: an English BPE "base" (LLaMA settings,
  byte_fallback) and a Chinese BPE "extra" trained on word-segmented text.

What makes held-out answers learnable by a model this small: questions are phrased like a statement of
their fact; QA text is a small part of the mix (much of it and the model memorises the QA pairs instead
of learning to answer from what it knows); part of it is chat-shaped, so the chat template is no new
world for the model after sft; and an answer is the same tokens after a question as in a statement
(segmented Chinese tokenizer, Latin words set off by spaces in Chinese text).

Same seed -> same bytes.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pydantic import Field

from minima.core.config import Closed, command_config

COUNTRIES = [  # (country, capital, country_zh, capital_zh)
    ("France", "Paris", "法国", "巴黎"),
    ("Germany", "Berlin", "德国", "柏林"),
    ("Japan", "Tokyo", "日本", "东京"),
    ("China", "Beijing", "中国", "北京"),
    ("Italy", "Rome", "意大利", "罗马"),
    ("Spain", "Madrid", "西班牙", "马德里"),
    ("Russia", "Moscow", "俄罗斯", "莫斯科"),
    ("Egypt", "Cairo", "埃及", "开罗"),
    ("Canada", "Ottawa", "加拿大", "渥太华"),
    ("Australia", "Canberra", "澳大利亚", "堪培拉"),
    ("Brazil", "Brasilia", "巴西", "巴西利亚"),
    ("India", "Delhi", "印度", "新德里"),
    ("Korea", "Seoul", "韩国", "首尔"),
    ("Thailand", "Bangkok", "泰国", "曼谷"),
    ("Greece", "Athens", "希腊", "雅典"),
    ("Turkey", "Ankara", "土耳其", "安卡拉"),
    ("Kenya", "Nairobi", "肯尼亚", "内罗毕"),
    ("Mexico", "Mexico City", "墨西哥", "墨西哥城"),
    ("Peru", "Lima", "秘鲁", "利马"),
    ("Norway", "Oslo", "挪威", "奥斯陆"),
    ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩"),
    ("Poland", "Warsaw", "波兰", "华沙"),
    ("Ireland", "Dublin", "爱尔兰", "都柏林"),
    ("Portugal", "Lisbon", "葡萄牙", "里斯本"),
]
COLORS = [  # (thing, colour, thing_zh, colour_zh)
    ("apple", "red", "苹果", "红色"),
    ("sky", "blue", "天空", "蓝色"),
    ("grass", "green", "草", "绿色"),
    ("snow", "white", "雪", "白色"),
    ("coal", "black", "煤", "黑色"),
    ("banana", "yellow", "香蕉", "黄色"),
    ("orange", "orange", "橙子", "橙色"),
    ("cloud", "white", "云", "白色"),
    ("leaf", "green", "叶子", "绿色"),
    ("blood", "red", "血", "红色"),
    ("sea", "blue", "大海", "蓝色"),
    ("night", "black", "夜晚", "黑色"),
]
WORDS = [
    ("water", "水"),
    ("cat", "猫"),
    ("dog", "狗"),
    ("book", "书"),
    ("moon", "月亮"),
    ("sun", "太阳"),
    ("tree", "树"),
    ("fish", "鱼"),
    ("bird", "鸟"),
    ("rice", "米饭"),
    ("tea", "茶"),
    ("flower", "花"),
    ("mountain", "山"),
    ("river", "河"),
    ("house", "房子"),
    ("car", "汽车"),
    ("friend", "朋友"),
    ("teacher", "老师"),
    ("student", "学生"),
    ("school", "学校"),
]
ZH_DIGITS = "零一二三四五六七八九十"


def _zh_number(n: int) -> str:
    if n <= 10:
        return ZH_DIGITS[n]
    tens, ones = divmod(n, 10)
    return ("" if tens == 1 else ZH_DIGITS[tens]) + "十" + (ZH_DIGITS[ones] if ones else "")


@dataclass
class Fact:
    """One fact in both languages: its statements (paraphrases), its question, its answer, the answer's
    distractor pool and the statement's stem up to the answer."""

    kind: str
    key: str
    en: list[str]
    zh: list[str]
    q_en: str
    q_zh: str
    answer_en: str
    answer_zh: str
    pool_en: list[str] = field(default_factory=list)
    pool_zh: list[str] = field(default_factory=list)
    stem_en: str = ""  # the answer sentence up to the answer ("The capital of France is")
    stem_zh: str = ""

    def statements(self, lang: str) -> list[str]:
        return self.en if lang == "en" else [space_latin(x) for x in self.zh]

    def question(self, lang: str) -> str:
        return self.q_en if lang == "en" else self.q_zh

    def answer(self, lang: str) -> str:
        return self.answer_en if lang == "en" else self.answer_zh

    def reply(self, lang: str) -> str:
        """The answer as a chat reply: the answer itself, as a sentence; an English sum as its equation
        ("3 plus 5 equals 8.", as English says it; Chinese answers 几 with the number)."""
        if self.kind == "add" and lang == "en":
            return f"{self.stem_en} {self.answer_en}."
        return f"{self.answer_en}." if lang == "en" else f"{self.answer_zh}。"


def facts() -> list[Fact]:
    """Every fact of the world. A question is phrased like one of its statements ("What is the capital of
    France?" / "The capital of France is Paris."), as questions about a fact usually are."""
    out: list[Fact] = []
    caps, caps_zh = [c[1] for c in COUNTRIES], [c[3] for c in COUNTRIES]
    for country, cap, country_zh, cap_zh in COUNTRIES:
        out.append(
            Fact(
                "capital",
                country,
                [
                    f"The capital of {country} is {cap}.",
                    f"{cap} is the capital of {country}.",
                    f"{country} has its capital in {cap}.",
                ],
                [
                    f"{country_zh}的首都是{cap_zh}。",
                    f"{cap_zh}是{country_zh}的首都。",
                    f"{country_zh}以{cap_zh}为首都。",
                ],
                f"What is the capital of {country}?",
                f"{country_zh}的首都是哪里？",
                cap,
                cap_zh,
                caps,
                caps_zh,
                f"The capital of {country} is",
                f"{country_zh}的首都是",
            )
        )
    colors, colors_zh = sorted({c[1] for c in COLORS}), sorted({c[3] for c in COLORS})
    for thing, color, thing_zh, color_zh in COLORS:
        out.append(
            Fact(
                "color",
                thing,
                [
                    f"The color of the {thing} is {color}.",
                    f"The {thing} is {color}.",
                    f"The {thing} has a {color} color.",
                ],
                [f"{thing_zh}的颜色是{color_zh}。", f"{thing_zh}是{color_zh}的。", f"{color_zh}是{thing_zh}的颜色。"],
                f"What is the color of the {thing}?",
                f"{thing_zh}的颜色是什么？",
                color,
                color_zh,
                colors,
                colors_zh,
                f"The color of the {thing} is",
                f"{thing_zh}的颜色是",
            )
        )
    words_en, words_zh = [w[0] for w in WORDS], [w[1] for w in WORDS]
    for en, zh in WORDS:
        out.append(
            Fact(
                "word",
                en,
                [f"The Chinese word for {en} is {zh}.", f"In Chinese, {en} is {zh}.", f"{zh} means {en}."],
                [f"{zh}的英文是{en}。", f"{en}的中文是{zh}。", f"{zh}在英文里是{en}。"],
                f"What is the Chinese word for {en}?",
                f"{zh}的英文是什么？",
                zh,
                en,
                words_zh,
                words_en,
                f"The Chinese word for {en} is",
                f"{zh}的英文是",
            )
        )
    numbers = [str(i) for i in range(2, 19)]
    for a in range(1, 10):
        for b in range(1, 10):
            c = a + b
            out.append(
                Fact(
                    "add",
                    f"{a}+{b}",
                    [f"{a} plus {b} equals {c}.", f"{a} + {b} = {c}."],
                    [f"{_zh_number(a)}加{_zh_number(b)}等于{_zh_number(c)}。", f"{a}加{b}等于{c}。"],
                    f"What is {a} plus {b}?",
                    f"{a}加{b}等于几？",
                    str(c),
                    str(c),
                    numbers,
                    numbers,
                    f"{a} plus {b} equals",
                    f"{a}加{b}等于",
                )
            )
    return out


def space_latin(text: str) -> str:
    """Chinese text with a space between a Latin word and the Chinese characters or punctuation before it, and
    the characters after it, as Chinese typography often sets them: the word is then the same tokens as in
    English text ("鱼的英文是 fish。")."""
    import re

    text = re.sub(r"(?<=[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef])(?=[A-Za-z])", " ", text)
    return re.sub(r"(?<=[A-Za-z])(?=[\u4e00-\u9fff])", " ", text)


# Question-answer text as the pretraining mix holds it: QA lines, and chat transcripts in MiniChat's turn
# tags. The separator between the sentences of a document, per language.
QA_LINE = {"en": "Question: {q} Answer: {a}", "zh": "问题：{q}回答：{a}"}
DIALOGUE = "[|User|] {q} [|Assistant|] {a}"
SEP = {"en": " ", "zh": ""}


def qa_text(question: str, reply: str, lang: str, dialogue: bool = False) -> str:
    """A question and its reply as one line of QA text (a QA line, or a chat transcript)."""
    text = (DIALOGUE if dialogue else QA_LINE[lang]).format(q=question, a=reply)
    return text if lang == "en" else space_latin(text)


def qa_prompt(question: str, lang: str) -> str:
    """The QA line of ``question`` up to its answer: the completion prompt of a base model."""
    return QA_LINE[lang].format(q=question, a="").rstrip()


@dataclass
class DemoCorpus:
    pretrain_en: list[str]
    pretrain_zh: list[str]
    heldout_en: list[str]
    heldout_zh: list[str]
    chat: list[list[dict]]
    mc_dev: list[dict]
    mc_test: list[dict]
    qa_dev: list[dict]
    qa_test: list[dict]


def _mc(fact: Fact, lang: str, rng: random.Random) -> dict:
    answer = fact.answer(lang)
    pool = sorted(set(fact.pool_en if lang == "en" else fact.pool_zh) - {answer})
    choices = rng.sample(pool, 3) + [answer]
    rng.shuffle(choices)
    return {
        "question": fact.question(lang),
        "prefix": fact.stem_en if lang == "en" else fact.stem_zh,
        "choices": choices,
        "gold": choices.index(answer),
        "lang": lang,
        "kind": fact.kind,
    }


def _qa(fact: Fact, lang: str) -> dict:
    """A free-answer item: the question, the gold answer and the reference reply."""
    return {
        "question": fact.question(lang),
        "answer": fact.answer(lang),
        "reply": fact.reply(lang),
        "lang": lang,
        "kind": fact.kind,
    }


def generate(
    seed: int = 0,
    docs_per_lang: int = 1500,
    qa_fraction: float | dict = 0.1,
    dialogue_fraction: float = 0.5,
    heldout_docs: int = 150,
) -> DemoCorpus:
    """Build the corpus.

    Facts are split 75/25 into chat-train / held-out. Every fact is stated in the pretraining text, in
    several paraphrases. A ``qa_fraction`` of the sentences about chat-train facts are QA text instead, a
    ``dialogue_fraction`` of it as chat transcripts, as web text mixes QA pages and chat logs into prose.
    A held-out fact's question is never in any training data. ``heldout_docs`` documents per language,
    drawn like the pretraining ones but never trained on, are the held-out text split (perplexity).
    """
    rng = random.Random(seed)
    all_facts = facts()
    order = list(range(len(all_facts)))
    rng.shuffle(order)
    n_test = len(order) // 4
    test_ids = set(order[:n_test])
    train_facts = [f for i, f in enumerate(all_facts) if i not in test_ids]
    train_keys = {(f.kind, f.key) for f in train_facts}

    qa_share = qa_fraction if isinstance(qa_fraction, dict) else {"en": qa_fraction, "zh": qa_fraction}

    def sentence(f: Fact, lang: str) -> str:
        if (f.kind, f.key) in train_keys and rng.random() < qa_share[lang]:
            return qa_text(f.question(lang), f.reply(lang), lang, dialogue=rng.random() < dialogue_fraction)
        return rng.choice(f.statements(lang))

    def doc(lang: str) -> str:
        text = SEP[lang].join(sentence(f, lang) for f in rng.sample(all_facts, rng.randint(3, 7)))
        return text if lang == "en" else space_latin(text)

    def docs(lang: str) -> list[str]:
        out = [doc(lang) for _ in range(docs_per_lang)]
        # Every statement appears at least once in each language, and every chat-train fact's QA text.
        for f in all_facts:
            out += f.statements(lang)
        for f in train_facts:
            out.append(qa_text(f.question(lang), f.reply(lang), lang))
            out.append(qa_text(f.question(lang), f.reply(lang), lang, dialogue=True))
        rng.shuffle(out)
        return out

    pretrain_en, pretrain_zh = docs("en"), docs("zh")

    def heldout(lang: str, seen: list[str]) -> list[str]:
        seen_set, out = set(seen), []
        while len(out) < heldout_docs:
            d = doc(lang)
            if d not in seen_set:
                out.append(d)
        return out

    heldout_en, heldout_zh = heldout("en", pretrain_en), heldout("zh", pretrain_zh)
    chat: list[list[dict]] = []
    for f in train_facts:
        for lang in ("en", "zh"):
            chat.append([{"User": f.question(lang), "Assistant": f.reply(lang)}])
    for _ in range(len(train_facts) // 2):  # some multi-turn conversations
        a, b = rng.sample(train_facts, 2)
        lang = rng.choice(["en", "zh"])
        chat.append([{"User": x.question(lang), "Assistant": x.reply(lang)} for x in (a, b)])
    rng.shuffle(chat)
    mc_test = [_mc(all_facts[i], lang, rng) for i in sorted(test_ids) for lang in ("en", "zh")]
    dev_pick = rng.sample(train_facts, min(20, len(train_facts)))
    mc_dev = [_mc(f, rng.choice(["en", "zh"]), rng) for f in dev_pick]
    qa_test = [_qa(all_facts[i], lang) for lang in ("en", "zh") for i in sorted(test_ids)]
    qa_dev = [_qa(f, lang) for lang in ("en", "zh") for f in dev_pick]
    return DemoCorpus(pretrain_en, pretrain_zh, heldout_en, heldout_zh, chat, mc_dev, mc_test, qa_dev, qa_test)


def _write(path: Path, text: str) -> None:
    from minima.core.artifacts import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write(
    out_dir: str | Path, seed: int = 0, docs_per_lang: int = 1500, tokenizers: bool = True, **world
) -> dict[str, Path]:
    """Write the demo corpus (and tokenizers) under ``out_dir``; returns the paths by name.

    ``world``: further :func:`generate` arguments.
    """
    out = Path(out_dir)
    c = generate(seed, docs_per_lang, **world)
    paths = {
        "pretrain_en": out / "text" / "pretrain_en.txt",
        "pretrain_zh": out / "text" / "pretrain_zh.txt",
        "heldout_en": out / "heldout" / "heldout_en.txt",
        "heldout_zh": out / "heldout" / "heldout_zh.txt",
        "chat": out / "chat" / "demo_chat.json",
        "mc_dev": out / "eval" / "demo_mc" / "dev.jsonl",
        "mc_test": out / "eval" / "demo_mc" / "test.jsonl",
        "qa_dev": out / "eval" / "demo_qa" / "dev.jsonl",
        "qa_test": out / "eval" / "demo_qa" / "test.jsonl",
    }
    for name in ("pretrain_en", "pretrain_zh"):
        _write(paths[name], "\n".join(getattr(c, name)) + "\n")
    # The held-out documents as one running text (no newline: the models never see one, documents are
    # separated by an end-of-text token in training), scored in windows of the trained context.
    for lang in ("en", "zh"):
        _write(paths[f"heldout_{lang}"], SEP[lang].join(getattr(c, f"heldout_{lang}")))
    _write(paths["chat"], json.dumps(c.chat, ensure_ascii=False, indent=1) + "\n")
    for name in ("mc_dev", "mc_test", "qa_dev", "qa_test"):
        _write(paths[name], _jsonl(getattr(c, name)))
    if tokenizers:
        paths["base_sp"] = out / "tokenizers" / "base_en.model"
        paths["extra_sp"] = out / "tokenizers" / "extra_zh.model"
        train_sentencepiece(c.pretrain_en, paths["base_sp"], vocab_size=1000, model_type="bpe", byte_fallback=True)
        train_sentencepiece(
            segment_zh(c.pretrain_zh),
            paths["extra_sp"],
            vocab_size=800,
            model_type="bpe",
            byte_fallback=False,
            add_dummy_prefix=False,
        )
    return paths


def segment_zh(lines: list[str]) -> list[str]:
    """Chinese lines cut before and after every name, answer and number of the world, as a word segmenter
    would: a tokenizer trained on the pieces has no piece that glues an answer to the word before it
    ("是蓝色"), so an answer is the same tokens in a statement and after a question."""
    import re

    words = {w for f in facts() if f.kind != "add" for w in (f.answer_zh, *f.pool_zh)}
    words |= {c[2] for c in COUNTRIES} | {c[2] for c in COLORS} | {w[1] for w in WORDS}
    words |= {_zh_number(n) for n in range(19)}
    pattern = re.compile("(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")")
    return [seg.strip() for line in lines for seg in pattern.split(line) if seg.strip()]


def train_sentencepiece(
    lines: list[str],
    out_file: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    add_dummy_prefix: bool = True,
) -> Path:
    """Train a SentencePiece model with LLaMA's settings (unk/bos/eos = 0/1/2, no pad, split digits)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=byte_fallback,
        split_digits=True,
        character_coverage=1.0 if not byte_fallback else 0.9995,
        normalization_rule_name="identity" if byte_fallback else "nmt_nfkc",
        add_dummy_prefix=add_dummy_prefix,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    return out


class DemoDataConfig(Closed):
    """Options of ``minima demo-data``."""

    out_dir: str = Field("runs/demo/data", description="Directory to write the corpus and tokenizers into.")
    seed: int = Field(0, description="Seed of the generated documents.")


def main(argv: Optional[list[str]] = None) -> int:
    """``minima demo-data out_dir=DIR [seed=0]``: write the demo corpus and tokenizers."""
    cfg = command_config(DemoDataConfig, argv, main.__doc__ or "")
    if cfg is None:  # --help
        return 0
    paths = write(cfg.out_dir, seed=cfg.seed)
    for name, p in paths.items():
        print(f"{name}: {p}")
    return 0
