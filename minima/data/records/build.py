"""``minima records``: tokenize text or chat sources once into TFRecord shards (train + dev).

Steps, each deterministic for a given config and inputs:

1. read every source's files into documents (lm: strings; chat: normalised conversations), with
   malformed records stopping the build at ``file:line`` or, with ``on_error=skip``, listed in
   ``skipped.jsonl``;
2. mix: take each source's ``size`` / ``weight`` share (:mod:`minima.data.records.mixing`), shuffle
   the documents (seeded) unless ``shuffle=false``, hold ``dev_fraction`` of them out;
3. tokenize in ``num_workers`` processes over ordered chunks, written in input order, so the
   output bytes do not depend on ``num_workers``;
4. write: ``lm`` packs ``[BOS] doc [EOS]`` streams into records of exactly ``max_length`` tokens
   (documents cross record boundaries; the last record of a split is padded with ``pad_id`` and
   carries a ``mask`` of 1 on real tokens, so nothing is dropped); ``chat`` writes one conversation
   per record with its loss ``mask`` and its ``source`` (index into the manifest's ``source_names``),
   truncated at an exchange boundary (or dropped) when too long;
   ``preference`` writes one pair per record: ``prompt``, ``chosen`` + ``chosen_mask``, ``rejected`` +
   ``rejected_mask`` (:mod:`minima.data.preference`: prompt cut from the left to ``max_prompt_length``,
   then the responses to ``max_length``; pairs left without a trained token, or with chosen ==
   rejected, are dropped and counted).

The artifact is published atomically by :func:`minima.core.artifacts.run_stage`: an error leaves no
output directory behind, and a rerun with the same tokenizer, input files (stats) and config is
skipped.
"""

from __future__ import annotations

import gc
import itertools
import json
import multiprocessing as mp
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from minima.core.config import RecordsConfig, Source
from minima.core.errors import ConfigError, InputError
from minima.core.logs import get_logger, progress
from minima.data.records.inputs import SourceItem, SourceReader, resolve_files
from minima.data.records.loaders import Loader, source_loader
from minima.data.records.mixing import SourcePlan, choose, dev_count, plan_counts
from minima.data.records.tfrecord_io import ShardWriter
from minima.data.tokenizers import load_tokenizer, tokenizer_dir

log = get_logger("minima.data.records")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
OK, TRUNCATED, DROPPED = 0, 1, 2
SKIPS_LOGGED = 5  # skipped records named in the log; the manifest names them all
TINY_DEV_RECORDS = 10  # a dev split below this many records gets a warning: its loss is noise


# ------------------------------------------------------------------------------ configuration
def sources_of(cfg: RecordsConfig) -> list[Source]:
    """The configured sources (a bare glob is one source named ``inputs``)."""
    if cfg.inputs is None or cfg.inputs == [] or cfg.inputs == "":
        raise ConfigError(
            "records needs inputs",
            where="RecordsConfig.inputs",
            fix="set inputs to a glob (inputs='data/*.jsonl') or a list of {name, path, size|weight}",
        )
    if isinstance(cfg.inputs, str):
        return [Source(name="inputs", path=cfg.inputs)]
    names = [s.name for s in cfg.inputs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(
            f"duplicate source name(s): {', '.join(dup)}",
            where="RecordsConfig.inputs",
            fix="give each source its own name",
        )
    return list(cfg.inputs)


def special_ids(tok: Any, cfg: RecordsConfig) -> dict[str, Optional[int]]:
    """bos/eos/pad ids; ConfigError when the tokenizer lacks what the build needs."""
    eos = tok.eos_token_id
    if eos is None:
        raise ConfigError(
            "the tokenizer has no EOS token; records need it to end documents and replies",
            where=str(cfg.tokenizer),
            fix="set eos_token in tokenizer_config.json",
        )
    bos = tok.bos_token_id
    if cfg.format == "lm" and cfg.add_bos and bos is None:
        raise ConfigError(
            "the tokenizer has no BOS token but add_bos=true",
            where=str(cfg.tokenizer),
            fix="set add_bos=false, or set bos_token in tokenizer_config.json",
        )
    pad = tok.pad_token_id
    if pad is None:  # LLaMA has no pad token; padding never carries a label, so unk (or eos) is safe
        pad = tok.unk_token_id if tok.unk_token_id is not None else eos
    return {"bos_id": bos, "eos_id": int(eos), "pad_id": int(pad)}


# -------------------------------------------------------------------------------------- reading
@dataclass
class SourceDocs:
    source: Source
    docs: list[SourceItem]
    files: int = 0
    records: int = 0
    empty: int = 0
    skipped: int = 0
    chosen: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def _doc_chars(payload: Any) -> int:
    if hasattr(payload, "chars"):  # a preference Pair
        return payload.chars()
    return len(payload) if isinstance(payload, str) else sum(len(m["content"]) for m in payload)


def _loader_of(cfg: RecordsConfig, s: Source) -> Optional[Loader]:
    """The source's raw-dataset loader (format=chat only; a name that matches one selects it)."""
    where = f"inputs[{s.name}]"
    if cfg.format != "chat":
        if s.loader or s.columns:
            raise ConfigError(
                f"source {s.name!r} sets loader/columns, which make conversations: they need format=chat",
                where=where,
                fix="set format=chat (chat_format=mc writes the JAX recipe's prompts)",
            )
        return None
    loader = source_loader(s.name, s.loader, s.columns, where)
    if loader is None and s.shape == "instruction":
        raise ConfigError(
            f"source {s.name!r}: shape=instruction applies to a named loader's records",
            where=where,
            fix="set the source's loader (arc, mmlu, winogrande, ...) or use another shape",
        )
    return loader


def read_sources(cfg: RecordsConfig, sources: list[Source], skipped: Optional[list]) -> list[SourceDocs]:
    """Every source's documents, in file order (skips go to ``skipped`` when it is a list)."""
    out = []
    for s in sources:

        def on_skip(where: str, reason: str, _name=s.name) -> None:
            skipped.append({"source": _name, "where": where, "reason": reason})

        reader = SourceReader(
            cfg.format,
            s.text_key or cfg.text_key,
            cfg.txt_document,
            s.shape,
            on_skip if skipped is not None else None,
            loader=_loader_of(cfg, s),
        )
        docs: list[SourceItem] = []
        for path in resolve_files(s.path):
            docs.extend(reader.read(path))
        st = reader.stats
        if not docs:
            detail = f"{st.records} records read, {st.empty} empty, {st.skipped} skipped"
            raise InputError(
                f"source {s.name!r} has no documents ({detail})",
                where=s.path,
                fix="check the files and text_key (empty lines and whitespace-only texts are not documents)",
            )
        out.append(SourceDocs(s, docs, st.files, st.records, st.empty, st.skipped))
    return out


# --------------------------------------------------------------------------------- tokenizing
# Worker state: the tokenizer and settings, and (with fork) the documents themselves, inherited
# from the parent so that tasks are just (split, start, end) and no text is pickled.
# A pool worker's state. Only pool children read it: the parent keeps its own state per build, so two
# builds running in threads of one process (the pipeline builds lm and chat records concurrently)
# never see each other's settings. _FORK_LOCK makes "set, then fork" atomic across those threads.
_WORKER: dict[str, Any] = {}
_FORK_LOCK = threading.Lock()


def _make_worker(tok: Any, cfg_fields: dict, payloads: Optional[dict]) -> dict:
    from minima.data.formats import get_format

    templated = cfg_fields["fmt"] == "chat" or (
        cfg_fields["fmt"] == "preference" and cfg_fields.get("preference_template") == "chat"
    )
    return dict(
        cfg_fields,
        tok=tok,
        payloads=payloads,
        chat=get_format(cfg_fields["chat_format"]) if templated else None,
    )


def _setup_worker(tok: Any, cfg_fields: dict, payloads: Optional[dict]) -> None:
    _WORKER.clear()
    _WORKER.update(_make_worker(tok, cfg_fields, payloads))


def _init_spawned_worker(tokenizer_dir: str, cfg_fields: dict) -> None:
    _setup_worker(load_tokenizer(tokenizer_dir), cfg_fields, None)


# A ChunkMapper takes (tokenizer_dir, worker fields, chunk tasks carrying their documents) and yields
# tokenize_chunk(...) of each task, in order, computed wherever it likes.
ChunkMapper = Callable[[str, dict, Iterable[tuple]], Iterator[tuple]]
_REMOTE: dict[tuple, dict] = {}


def tokenize_chunk(tokenizer_dir: str, cfg_fields: dict, task: tuple) -> tuple:
    """Tokenize one chunk task in any process (a Dask worker): the tokenizer is loaded once per process."""
    key = (tokenizer_dir, tuple(sorted(cfg_fields.items())))
    w = _REMOTE.get(key)
    if w is None:
        w = _REMOTE[key] = _make_worker(load_tokenizer(tokenizer_dir), cfg_fields, None)
    return _tokenize_task(task, w)


def _tokenize_task(task: tuple, w: Optional[dict] = None) -> tuple:
    """Tokenize documents ``start:end`` of a split (or the payloads sent along, without fork).

    Returns flat arrays, cheap to send back: lm ``(ids int32, lengths)``; chat ``(ids int32,
    mask int8, lengths, status)`` with status OK / TRUNCATED / DROPPED per conversation.
    """
    from minima.data.formats import tokenize_texts

    split, start, end, sent = task
    w = _WORKER if w is None else w
    payloads = sent if sent is not None else w["payloads"][split][start:end]
    tok = w["tok"]
    if w["fmt"] == "lm":
        texts = [t.lower() for t in payloads] if w["lowercase"] else payloads
        # split_special_tokens: a literal "</s>" in a document is text, not a separator.
        ids = tokenize_texts(tok, texts, split_special_tokens=True)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        return flat, lengths
    if w["fmt"] == "preference":
        return _tokenize_pairs(payloads, w)
    if w["lowercase"]:
        payloads = [[{"role": m["role"], "content": m["content"].lower()} for m in msgs] for msgs in payloads]
    ids_out: list[int] = []
    mask_out: list[int] = []
    lengths, status = [], []
    for groups in w["chat"].encode_batch(tok, payloads):
        ids: list[int] = []
        mask: list[int] = []
        st = OK
        for gi, (gids, gmask) in enumerate(groups):  # group 0 is the header, then one per exchange
            if len(ids) + len(gids) > w["max_length"]:
                st = DROPPED if (gi <= 1 or w["overflow"] == "drop") else TRUNCATED
                break
            ids += gids
            mask += gmask
        if st == DROPPED:
            ids, mask = [], []
        ids_out += ids
        mask_out += mask
        lengths.append(len(ids))
        status.append(st)
    return (
        np.asarray(ids_out, dtype=np.int32),
        np.asarray(mask_out, dtype=np.int8),
        np.asarray(lengths, dtype=np.int64),
        np.asarray(status, dtype=np.int8),
    )


def _lower_pair(pair):
    from minima.data.preference import Pair

    def low(msgs):
        return [{**m, "content": m["content"].lower()} for m in msgs]

    text = tuple(t.lower() for t in pair.text) if pair.text is not None else None
    return Pair(low(pair.prompt), low(pair.chosen), low(pair.rejected), text)


def _tokenize_pairs(pairs: list, w: dict) -> tuple:
    """Preference pairs -> flat ``prompt, chosen, chosen_mask, rejected, rejected_mask`` arrays, the three
    lengths per pair and its status (dropped pairs have length 0)."""
    from minima.data.preference import DROPPED, IDENTICAL, encode_pairs, truncate_pair

    tok = w["tok"]
    if w["lowercase"]:
        pairs = [_lower_pair(p) for p in pairs]
    bos = tok.bos_token_id
    parts: list[list[int]] = [[], [], [], [], []]
    lengths, status = [], []
    for enc in encode_pairs(tok, w["chat"], pairs, bos, tok.eos_token_id):
        enc, st = truncate_pair(enc, w["max_length"], w["max_prompt_length"], bos)
        if st in (DROPPED, IDENTICAL):
            enc = ([], [], [], [], [])
        for k in range(5):
            parts[k] += enc[k]
        lengths.append((len(enc[0]), len(enc[1]), len(enc[3])))
        status.append(st)
    dt = (np.int32, np.int32, np.int8, np.int32, np.int8)
    return (
        *(np.asarray(p, dtype=t) for p, t in zip(parts, dt)),
        np.asarray(lengths, dtype=np.int64).reshape(-1, 3),
        np.asarray(status, dtype=np.int8),
    )


class Tokenizing:
    """Ordered tokenization of each split's documents, in this process or a process pool.

    Chunks are tokenized independently and consumed in submission order, so the result does not
    depend on the number of workers.
    """

    def __init__(self, cfg: RecordsConfig, tok: Any, payloads: dict[str, list], mapper: Optional[ChunkMapper] = None):
        self.cfg = cfg
        self.payloads = payloads
        fields = dict(
            fmt=cfg.format,
            chat_format=cfg.chat_format,
            lowercase=cfg.lowercase,
            max_length=cfg.max_length,
            overflow=cfg.overflow,
            max_prompt_length=cfg.max_prompt_length,
            preference_template=cfg.preference_template,
        )
        self.fields, self.mapper = fields, mapper
        self.pool = None
        self.fork = "fork" in mp.get_all_start_methods()
        if mapper is not None:
            self.local = None
            return
        self.fork = "fork" in mp.get_all_start_methods()
        self.local = _make_worker(tok, fields, payloads) if cfg.num_workers <= 1 else None
        if cfg.num_workers > 1:
            if self.fork:  # children inherit _WORKER, tokenizer and documents included
                with _FORK_LOCK:
                    _setup_worker(tok, fields, payloads)
                    # Move every existing object out of the collector's reach: a child's gc pass would
                    # otherwise touch (and copy-on-write) the parent's whole heap.
                    gc.freeze()
                    try:
                        self.pool = mp.get_context("fork").Pool(cfg.num_workers)
                    finally:
                        gc.unfreeze()
                        _WORKER.clear()
            else:
                self.pool = mp.get_context("spawn").Pool(
                    cfg.num_workers, initializer=_init_spawned_worker, initargs=(str(cfg.tokenizer), fields)
                )

    def run(self, split: str) -> Iterator[tuple]:
        n, size = len(self.payloads[split]), self.cfg.chunk_size
        tasks = (
            (split, i, min(i + size, n), None if self.fork else self.payloads[split][i : i + size])
            for i in range(0, n, size)
        )
        if self.mapper is not None:
            sent = ((sp, a, b, self.payloads[sp][a:b]) for sp, a, b, _ in tasks)
            results = self.mapper(str(self.cfg.tokenizer), self.fields, sent)
        elif self.pool:
            results = self.pool.imap(_tokenize_task, tasks, chunksize=1)
        else:
            results = (_tokenize_task(t, self.local) for t in tasks)
        yield from progress(results, f"tokenize {split}", total=-(-n // size), unit="chunk")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


# ------------------------------------------------------------------------------------ writing
class Packer:
    """Packs ``[BOS] doc [EOS]`` token streams into records of exactly ``max_length`` tokens."""

    def __init__(self, writer: ShardWriter, max_length: int, bos: Optional[int], eos: int, pad: int):
        self.writer, self.max_length, self.bos, self.eos, self.pad = writer, max_length, bos, eos, pad
        self.carry = np.zeros(0, dtype=np.int64)
        self.tokens = 0
        self.padding = 0

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Append a chunk's documents; returns each document's token count (with BOS/EOS)."""
        extra = 1 + (self.bos is not None)
        sizes = lengths + extra
        stream = np.empty(int(sizes.sum()), dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        content = np.ones(len(stream), dtype=bool)
        if self.bos is not None:
            stream[starts] = self.bos
            content[starts] = False
        ends = starts + sizes - 1
        stream[ends] = self.eos
        content[ends] = False
        stream[content] = flat
        self.tokens += len(stream)
        buf = np.concatenate([self.carry, stream]) if len(self.carry) else stream
        n_full = len(buf) // self.max_length
        for i in range(n_full):
            self.writer.write({"indices": buf[i * self.max_length : (i + 1) * self.max_length]})
        self.carry = buf[n_full * self.max_length :].copy()
        return sizes

    def finish(self) -> None:
        """Write the tail record, padded to ``max_length``, with mask 1 on its real tokens."""
        n = len(self.carry)
        if n == 0:
            return
        ids = np.full(self.max_length, self.pad, dtype=np.int64)
        ids[:n] = self.carry
        mask = np.zeros(self.max_length, dtype=np.int64)
        mask[:n] = 1
        self.writer.write({"indices": ids, "mask": mask})
        self.padding += self.max_length - n
        self.carry = np.zeros(0, dtype=np.int64)


@dataclass
class SplitStats:
    records: int = 0
    docs: int = 0
    tokens: int = 0
    padding: int = 0
    bytes: int = 0
    shards: int = 0
    truncated: int = 0
    dropped: int = 0
    min_id: Optional[int] = None
    max_id: Optional[int] = None
    identical: int = 0


def write_split(
    cfg: RecordsConfig,
    name: str,
    docs: list[tuple[int, SourceItem]],
    out_dir: Path,
    ids: dict,
    tokenizing: Tokenizing,
    src_tokens: np.ndarray,
    src_dropped: np.ndarray,
    src_truncated: np.ndarray,
) -> SplitStats:
    """Tokenize and write one split's documents (``(source index, doc)`` in output order)."""
    stats = SplitStats(docs=len(docs))
    writer = ShardWriter(out_dir / name, cfg.shard_size)
    src = np.array([s for s, _ in docs], dtype=np.int64)
    pos = 0
    with writer:
        if cfg.format == "lm":
            packer = Packer(
                writer, cfg.max_length, ids["bos_id"] if cfg.add_bos else None, ids["eos_id"], ids["pad_id"]
            )
            for flat, lengths in tokenizing.run(name):
                sizes = packer.add(flat, lengths)
                np.add.at(src_tokens, src[pos : pos + len(lengths)], sizes)
                pos += len(lengths)
            packer.finish()
            stats.tokens, stats.padding = packer.tokens, packer.padding
        elif cfg.format == "preference":
            _write_pairs(tokenizing.run(name), writer, stats, src, pos, src_tokens, src_dropped, src_truncated)
        else:
            for flat, mask, lengths, status in tokenizing.run(name):
                offsets = np.concatenate([[0], np.cumsum(lengths)])
                for k in range(len(lengths)):
                    s = src[pos]
                    pos += 1
                    if status[k] == DROPPED:
                        stats.dropped += 1
                        src_dropped[s] += 1
                        continue
                    if status[k] == TRUNCATED:
                        stats.truncated += 1
                        src_truncated[s] += 1
                    a, b = offsets[k], offsets[k + 1]
                    # ``source``: the record's source, an index into the manifest's ``source_names``.
                    writer.write({"indices": flat[a:b], "mask": mask[a:b], "source": src[pos - 1 : pos]})
                    stats.tokens += int(b - a)
                    src_tokens[s] += int(b - a)
    stats.records, stats.bytes, stats.shards = writer.num_records, writer.num_bytes, len(writer.files)
    stats.min_id, stats.max_id = writer.min_id, writer.max_id
    return stats


def dev_split_warnings(cfg: RecordsConfig, dev: SplitStats, n_docs: int) -> list[str]:
    """A warning when the dev split is empty although asked for, or too small for a useful dev loss."""
    if cfg.dev_fraction <= 0:
        return []
    if dev.records == 0:
        return [
            f"the dev split is empty: dev_fraction={cfg.dev_fraction:g} of {n_docs} documents selects none, "
            "so training reports no dev loss (raise dev_fraction or add documents)"
        ]
    if dev.records < TINY_DEV_RECORDS:
        return [
            f"the dev split is tiny: {dev.records} records ({dev.tokens} tokens) from dev_fraction="
            f"{cfg.dev_fraction:g}; its loss will be noisy (raise dev_fraction or add documents)"
        ]
    return []


def _write_pairs(chunks, writer, stats, src, pos, src_tokens, src_dropped, src_truncated) -> None:
    """Write tokenized preference chunks (see :func:`_tokenize_pairs`), one pair per record."""
    from minima.data.preference import DROPPED, IDENTICAL, TRUNCATED

    for prompt, chosen, c_mask, rejected, r_mask, lengths, status in chunks:
        off = np.zeros(3, dtype=np.int64)
        for k in range(len(status)):
            s = src[pos]
            pos += 1
            lp, lc, lr = (int(x) for x in lengths[k])
            a = off.copy()
            off += lengths[k]
            if status[k] in (DROPPED, IDENTICAL):
                stats.dropped += int(status[k] == DROPPED)
                stats.identical += int(status[k] == IDENTICAL)
                src_dropped[s] += 1
                continue
            if status[k] == TRUNCATED:
                stats.truncated += 1
                src_truncated[s] += 1
            writer.write(
                {
                    "prompt": prompt[a[0] : a[0] + lp],
                    "chosen": chosen[a[1] : a[1] + lc],
                    "chosen_mask": c_mask[a[1] : a[1] + lc],
                    "rejected": rejected[a[2] : a[2] + lr],
                    "rejected_mask": r_mask[a[2] : a[2] + lr],
                }
            )
            stats.tokens += lp + lc + lr
            src_tokens[s] += lp + lc + lr


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files (not model weights) so later stages can check vocab agreement."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and (f.name in TOKENIZER_FILES or f.suffix == ".model"):
            shutil.copyfile(f, dst / f.name)


def _preference_metrics(cfg: RecordsConfig, tok: Any, stats: dict) -> dict:
    from minima.data.preference import tokenizer_fingerprint

    return {
        "chat_format": cfg.chat_format if cfg.preference_template == "chat" else None,
        "preference_template": cfg.preference_template,
        "max_prompt_length": cfg.max_prompt_length,
        "dropped_identical": sum(s.identical for s in stats.values()),
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
    }


# -------------------------------------------------------------------------------------- build
def build_records(cfg: RecordsConfig, out_dir: str | os.PathLike, mapper: Optional[ChunkMapper] = None) -> dict:
    """Build the records into ``out_dir`` (normally run_stage's work dir) and return the metrics."""
    # Parallelism comes from our process pool; tokenizers' own threads would oversubscribe cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(out_dir)
    t0 = time.time()
    sources = sources_of(cfg)
    tok = load_tokenizer(cfg.tokenizer)
    ids = special_ids(tok, cfg)
    if cfg.format == "chat" or (cfg.format == "preference" and cfg.preference_template == "chat"):
        from minima.data.formats import get_format

        get_format(cfg.chat_format).encode(
            tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        )

    skipped: Optional[list] = [] if cfg.on_error == "skip" else None
    read = read_sources(cfg, sources, skipped)
    if cfg.format == "preference" and cfg.preference_template == "plain":
        for sd in read:
            bad = next((d for d in sd.docs if d.payload.text is None), None)
            if bad is not None:
                raise ConfigError(
                    "preference_template=plain tokenizes text, and this pair is made of message lists",
                    where=bad.where,
                    fix="use preference_template=chat (the chat format renders the messages)",
                )
    plans = [SourcePlan(sd.source.name, len(sd.docs), sd.source.size, sd.source.weight) for sd in read]
    counts = plan_counts(plans)
    mixed: list[tuple[int, SourceItem]] = []
    for i, (sd, k) in enumerate(zip(read, counts)):
        sd.chosen = choose(len(sd.docs), k, cfg.seed, sd.source.name)
        mixed.extend((i, sd.docs[j]) for j in sd.chosen)
    if not mixed:
        raise InputError(
            "the mix selects no documents", where="RecordsConfig.inputs", fix="raise the sources' size or weight"
        )
    rng = np.random.default_rng([cfg.seed, 7])
    if cfg.shuffle:
        mixed = [mixed[j] for j in rng.permutation(len(mixed))]
    n_dev = dev_count(len(mixed), cfg.dev_fraction)
    is_dev = np.zeros(len(mixed), dtype=bool)
    if n_dev:
        is_dev[np.random.default_rng([cfg.seed, 11]).choice(len(mixed), size=n_dev, replace=False)] = True
    splits = {"train": [d for d, dv in zip(mixed, is_dev) if not dv], "dev": [d for d, dv in zip(mixed, is_dev) if dv]}
    log.info(
        "records: %d documents from %d source(s) -> %d train / %d dev",
        len(mixed),
        len(read),
        len(splits["train"]),
        n_dev,
    )

    src_tokens = np.zeros(len(read), dtype=np.int64)
    src_dropped = np.zeros(len(read), dtype=np.int64)
    src_truncated = np.zeros(len(read), dtype=np.int64)
    t_tok = time.time()
    tokenizing = Tokenizing(cfg, tok, {name: [d.payload for _, d in docs] for name, docs in splits.items()}, mapper)
    try:
        stats = {
            name: write_split(cfg, name, docs, out, ids, tokenizing, src_tokens, src_dropped, src_truncated)
            for name, docs in splits.items()
        }
    finally:
        tokenizing.close()
    tokenize_s = time.time() - t_tok
    copy_tokenizer(tokenizer_dir(cfg.tokenizer), out / "tokenizer")
    if skipped is not None:
        with open(out / "skipped.jsonl", "w", encoding="utf-8") as f:
            for row in skipped:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        for row in skipped[:SKIPS_LOGGED]:
            log.warning("records: skipped %s: %s", row["where"], row["reason"])
        if len(skipped) > SKIPS_LOGGED:
            log.warning(
                "records: %d more skipped records are named in the manifest (metrics.skipped_records)",
                len(skipped) - SKIPS_LOGGED,
            )
    warnings = dev_split_warnings(cfg, stats["dev"], len(mixed))
    for w in warnings:
        log.warning("records: %s", w)

    total_tokens = sum(s.tokens for s in stats.values())
    total_bytes = sum(s.bytes for s in stats.values())
    per_source = {}
    for i, sd in enumerate(read):
        chars_all = sum(_doc_chars(d.payload) for d in sd.docs)
        chars_sel = sum(_doc_chars(sd.docs[j].payload) for j in sd.chosen)
        tok_sel = int(src_tokens[i])
        per_source[sd.source.name] = {
            "path": sd.source.path,
            "files": sd.files,
            "records_read": sd.records,
            "empty": sd.empty,
            "skipped": sd.skipped,
            "docs_before": len(sd.docs),
            "chars_before": chars_all,
            # Only the chosen documents are tokenized; the total is estimated at their tokens/char.
            "tokens_before_est": int(round(tok_sel * chars_all / chars_sel)) if chars_sel else 0,
            "docs_after": int(len(sd.chosen)),
            "chars_after": chars_sel,
            "tokens_after": tok_sel,
            "share_docs": round(len(sd.chosen) / len(mixed), 6),
            "share_tokens": round(tok_sel / total_tokens, 6) if total_tokens else 0.0,
            "dropped_too_long": int(src_dropped[i]),
            "truncated": int(src_truncated[i]),
        }
    metrics = {
        "format": cfg.format,
        "chat_format": cfg.chat_format if cfg.format == "chat" else None,
        "max_length": cfg.max_length,
        "vocab_size": len(tok),
        **ids,
        "num_records": {k: s.records for k, s in stats.items()},
        "num_tokens": {k: s.tokens for k, s in stats.items()},
        "total_tokens": total_tokens,
        "num_docs": {k: s.docs for k, s in stats.items()},
        "num_shards": {k: s.shards for k, s in stats.items()},
        "padding_tokens": {k: s.padding for k, s in stats.items()},
        "bytes": {k: s.bytes for k, s in stats.items()},
        "bytes_per_token": round(total_bytes / total_tokens, 4) if total_tokens else None,
        # every token id in the shards lies in [min_token_id, max_token_id] (trainers check vocab from this)
        "min_token_id": min((s.min_id for s in stats.values() if s.min_id is not None), default=None),
        "max_token_id": max((s.max_id for s in stats.values() if s.max_id is not None), default=None),
        "dropped_too_long": sum(s.dropped for s in stats.values()),
        "truncated": sum(s.truncated for s in stats.values()),
        **(_preference_metrics(cfg, tok, stats) if cfg.format == "preference" else {}),
        "skipped": len(skipped) if skipped is not None else 0,
        "skipped_records": [f"{r['where']}: {r['reason']}" for r in skipped or []],
        "warnings": warnings,
        "empty": sum(sd.empty for sd in read),
        "sources": per_source,
        "source_names": [sd.source.name for sd in read],
        "tokenize_s": round(tokenize_s, 3),
        "tokens_per_s": round(total_tokens / tokenize_s) if tokenize_s > 0 else None,
        "build_s": round(time.time() - t0, 3),
    }
    log.info(
        "records: %d train / %d dev records, %d tokens, %.2f bytes/token",
        stats["train"].records,
        stats["dev"].records,
        total_tokens,
        metrics["bytes_per_token"] or 0,
    )
    return metrics
