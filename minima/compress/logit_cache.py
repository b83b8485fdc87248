"""The teacher's logit cache: run the teacher once over the records, store sparse targets per position.

Layout (``cache.json`` plus one directory per records shard with offsets, fingerprints, ids,
values and rest mass) is described in :mod:`minima.stages.distill`; ``LogitCache`` reads it back by
global record id and checks each record's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from minima.core.config import DistillCacheConfig
from minima.core.errors import DataError, InputError
from minima.core.logs import progress
from minima.data.records import RecordDataset, collate
from minima.models.loader import _device, load_teacher
from minima.train.objectives.kd import (
    IGNORE_INDEX,
    SparseTargets,
    sampled_targets,
    top_k_targets,
)

CACHE_FORMAT = "minima-logit-cache/1"


CACHE_META = "cache.json"


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[:, t + 1] at position t (what the logits at t predict); -100 at the last position."""
    nxt = torch.full_like(labels, IGNORE_INDEX)
    nxt[:, :-1] = labels[:, 1:]
    return nxt


def fingerprint(ids) -> int:
    """64-bit blake2b of a record's token ids (as int64), the cache's alignment check."""
    arr = np.ascontiguousarray(np.asarray(ids, dtype=np.int64))
    return int.from_bytes(hashlib.blake2b(arr.tobytes(), digest_size=8).digest(), "little")


def read_cache_meta(cache_dir: str | os.PathLike) -> dict:
    p = Path(cache_dir) / CACHE_META
    if not p.is_file():
        raise InputError(
            f"{cache_dir} is not a logit cache (no {CACHE_META})",
            where="cache_dir",
            fix="build it with `minima distill-cache` (same teacher, records and cache settings)",
        )
    meta = json.loads(p.read_text())
    if meta.get("format") != CACHE_FORMAT:
        raise InputError(f"unknown logit cache format {meta.get('format')!r}", where=str(p), fix="rebuild the cache")
    return meta


def _split_files(records: str, split: str) -> list[str]:
    from minima.data.records.reader import split_files

    rec = Path(records) / split
    return split_files(records, split) if rec.is_dir() else []


class _ShardWriter:
    """Preallocated .npy arrays of one shard, filled position by position (streams to disk)."""

    def __init__(self, d: Path, lengths: list[int], prints: list[int], mode: str, k: int, dtype):
        from numpy.lib.format import open_memmap

        d.mkdir(parents=True, exist_ok=True)
        self.dir = d
        self.offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        np.save(d / "offsets.npy", self.offsets)
        np.save(d / "fingerprints.npy", np.asarray(prints, dtype=np.uint64))
        p = int(self.offsets[-1])
        self.ids = open_memmap(d / "ids.npy", mode="w+", dtype=np.int32, shape=(p, k))
        self.values = open_memmap(d / "values.npy", mode="w+", dtype=dtype, shape=(p, k))
        if mode == "top_k":
            self.rest = open_memmap(d / "rest.npy", mode="w+", dtype=np.float32, shape=(p,))
        else:
            self.weights = open_memmap(d / "weights.npy", mode="w+", dtype=dtype, shape=(p, k))
        self.mode = mode

    def put(self, r: int, t: SparseTargets, lo: int = 0) -> None:
        """Record r's rows, taken from rows lo.. of ``t`` (one record or a flattened batch)."""
        a, b = int(self.offsets[r]), int(self.offsets[r + 1])
        hi = lo + b - a
        self.ids[a:b] = t.ids[lo:hi].cpu().numpy().astype(np.int32)
        self.values[a:b] = t.values[lo:hi].float().cpu().numpy().astype(self.values.dtype)
        if self.mode == "top_k":
            self.rest[a:b] = t.rest[lo:hi].float().cpu().numpy()
        else:
            self.weights[a:b] = t.weights[lo:hi].float().cpu().numpy().astype(self.weights.dtype)

    def close(self, meta: dict) -> None:
        for name in ("ids", "values", "rest", "weights"):
            arr = getattr(self, name, None)
            if arr is not None:
                arr.flush()
        del self.ids, self.values
        (self.dir / "done.json").write_text(json.dumps(meta))


def cache_ranks() -> tuple[int, int]:
    """(rank, world size) of this cache build: the process group's, joined here when torchrun started us."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _host_targets(t: SparseTargets):
    """Start copying top-k targets to (pinned) host memory without waiting; returns (targets, event)."""
    if t.ids.device.type != "cuda":
        return t, None

    def copy(x):
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return host.copy_(x, non_blocking=True)

    host = SparseTargets(t.mode, copy(t.ids), copy(t.values), copy(t.rest), None, t.temperature)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _flush(writer: _ShardWriter, pending) -> None:
    """Write a batch of top-k targets once its host copy has landed."""
    if pending is not None:
        t, event, first, rows, seq = pending
        if event is not None:
            event.synchronize()
        for i in range(rows):
            writer.put(first + i, t, lo=i * seq)


def write_cache(ccfg: DistillCacheConfig, out: Path, rank: int = 0, world: int = 1) -> dict:
    """Run the teacher over every record of every split and write the sparse targets into ``out``.

    With ``world`` ranks (torchrun; every rank calls this with the same ``out``, on a shared file system)
    rank r takes shards r, r + world, ...; each shard is its own directory with a ``done.json``, so an
    interrupted build resumes shard by shard. Top-k targets are copied to the host asynchronously: a
    batch is written while the next one runs on the GPU.
    """
    from minima.data.records.tfrecord_io import read_index

    device = _device(ccfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    teacher = load_teacher(ccfg.teacher, device)
    if ccfg.attn_implementation:
        teacher.set_attn_implementation(ccfg.attn_implementation)
    vocab = int(teacher.config.vocab_size)
    k = min(ccfg.top_k, vocab) if ccfg.mode == "top_k" else ccfg.top_k
    dtype = np.float16 if ccfg.dtype == "fp16" else np.float32
    meta = {
        "format": CACHE_FORMAT,
        "mode": ccfg.mode,
        "k": ccfg.top_k,
        "stored_k": k,
        "temperature": ccfg.temperature,
        "proposal_power": ccfg.proposal_power,
        "dtype": ccfg.dtype,
        "vocab_size": vocab,
        "teacher": str(ccfg.teacher),
        "records": str(ccfg.records),
        "splits": {},
    }
    totals = {"cached_positions": 0, "cached_records": 0, "cache_bytes": 0}
    for split in ("train", "dev"):
        files = _split_files(ccfg.records, split)
        if not files:
            continue
        ds = RecordDataset(ccfg.records, split, shuffle_buffer=0)
        meta["splits"][split] = [Path(f).name.rsplit(".", 1)[0] for f in files]
        start = 0
        for j, f in enumerate(files):
            n = len(read_index(f))
            shard = out / split / Path(f).name.rsplit(".", 1)[0]
            if j % world != rank or (shard / "done.json").is_file():  # another rank's, or finished before
                start += n
                continue
            # pass 1 sizes the arrays (reading records is cheap next to the teacher), pass 2 fills them
            lengths, prints = [], []
            for r in range(n):
                ids = ds.read(start + r)["input_ids"]
                lengths.append(len(ids))
                prints.append(fingerprint(ids.numpy()))
            w = _ShardWriter(shard, lengths, prints, ccfg.mode, k, dtype)
            bs = ccfg.batch_size
            pending = None  # the previous batch's top-k targets, on their way to the host
            for b0 in progress(
                range(0, n, bs), desc=f"teacher {split}/{shard.name}", total=math.ceil(n / bs), unit="batch"
            ):
                batch = collate([ds.read(start + r) for r in range(b0, min(b0 + bs, n))], ds.pad_id)
                with torch.no_grad():
                    logits = teacher(
                        input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                        use_cache=False,
                    ).logits
                if ccfg.mode == "top_k":  # one top-k over the whole batch; padding rows are skipped on write
                    seq = logits.shape[1]
                    t = top_k_targets(logits.reshape(-1, logits.shape[-1]), k, ccfg.temperature)
                    host, event = _host_targets(t)
                    _flush(w, pending)  # the previous batch, copied while this one ran
                    pending = (host, event, b0, logits.shape[0], seq)
                    continue
                for i in range(logits.shape[0]):  # sampled: one generator per record, so batching does not matter
                    rows = logits[i, : lengths[b0 + i]]
                    gen = torch.Generator(device=rows.device).manual_seed(ccfg.seed * 1_000_003 + start + b0 + i)
                    w.put(b0 + i, sampled_targets(rows, k, ccfg.temperature, ccfg.proposal_power, gen))
            _flush(w, pending)
            w.close({"records": n, "positions": int(w.offsets[-1]), "rank": rank})
            start += n
    rank_barrier(world)  # every rank's shards are written
    if rank != 0:
        return {}
    for split in meta["splits"]:
        for d in (out / split).iterdir():
            totals["cache_bytes"] += sum(x.stat().st_size for x in d.iterdir())
            totals["cached_positions"] += int(np.load(d / "offsets.npy")[-1])
            totals["cached_records"] += len(np.load(d / "fingerprints.npy"))
    (out / CACHE_META).write_text(json.dumps(meta, indent=2))
    return {
        **totals,
        "mode": ccfg.mode,
        "k": ccfg.top_k,
        "temperature": ccfg.temperature,
        "vocab_size": vocab,
        "bytes_per_position": round(totals["cache_bytes"] / max(totals["cached_positions"], 1), 2),
    }


class LogitCache:
    """Reads one split of a logit cache by global record id (memory-mapped, opened lazily)."""

    def __init__(self, cache_dir: str | os.PathLike, split: str, record_files: list[str]):
        self.dir = Path(cache_dir)
        self.meta = read_cache_meta(cache_dir)
        self.split = split
        names = [Path(f).name.rsplit(".", 1)[0] for f in record_files]
        cached = self.meta["splits"].get(split)
        if cached != names:
            raise InputError(
                f"the logit cache's {split} shards {cached} do not match the records' {names}",
                where=str(self.dir / CACHE_META),
                fix="rebuild the cache for these records (`minima distill-cache`)",
            )
        self.shards = [self.dir / split / n for n in names]
        counts = [len(np.load(d / "fingerprints.npy", mmap_mode="r")) for d in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._open: dict[int, dict] = {}

    def _arrays(self, i: int) -> dict:
        if i not in self._open:
            d = self.shards[i]
            names = ["offsets", "fingerprints", "ids", "values"] + (
                ["rest"] if self.meta["mode"] == "top_k" else ["weights"]
            )
            self._open[i] = {n: np.load(d / f"{n}.npy", mmap_mode="r") for n in names}
        return self._open[i]

    def targets(self, record_id: int, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        i = int(np.searchsorted(self.starts, record_id, side="right") - 1)
        r = record_id - int(self.starts[i])
        a = self._arrays(i)
        lo, hi = int(a["offsets"][r]), int(a["offsets"][r + 1])
        if hi - lo != len(input_ids) or int(a["fingerprints"][r]) != fingerprint(input_ids.numpy()):
            raise DataError(
                f"logit cache row does not match the record (length {hi - lo} vs {len(input_ids)}, or its tokens)",
                where=f"{self.shards[i]} record {r}",
                fix="the records changed since the cache was built: rebuild it",
            )
        out = {
            "kd_ids": torch.from_numpy(np.array(a["ids"][lo:hi])),
            "kd_values": torch.from_numpy(np.array(a["values"][lo:hi])),
        }
        if self.meta["mode"] == "top_k":
            out["kd_rest"] = torch.from_numpy(np.array(a["rest"][lo:hi]))
        else:
            out["kd_weights"] = torch.from_numpy(np.array(a["weights"][lo:hi]))
        return out

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = {}  # memory maps are reopened in DataLoader workers
        return state


class CachedRecordDataset(RecordDataset):
    """A RecordDataset whose samples also carry the cached teacher targets of each position."""

    def __init__(self, records: str, split: str, cache_dir: str, **kw):
        super().__init__(records, split, **kw)
        self.cache = LogitCache(cache_dir, split, self.files)

    def read(self, record_id: int) -> dict[str, torch.Tensor]:
        sample = super().read(record_id)
        sample.update(self.cache.targets(record_id, sample["input_ids"]))
        return sample


def collate_targets(batch: list[dict], length: int) -> dict[str, torch.Tensor]:
    """Pad the per-position cached targets of a batch to [B, length, k] (padding rows carry no label)."""
    out = {}
    for key in ("kd_ids", "kd_values", "kd_rest", "kd_weights"):
        if key not in batch[0]:
            continue
        first = batch[0][key]
        shape = (len(batch), length) + tuple(first.shape[1:])
        t = torch.zeros(shape, dtype=torch.long if key == "kd_ids" else torch.float32)
        for i, s in enumerate(batch):
            t[i, : len(s[key])] = s[key].to(t.dtype)
        out[key] = t
    return out
