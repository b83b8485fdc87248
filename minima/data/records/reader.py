"""The records reader: a resumable, sharded torch IterableDataset over a records artifact.

Order of one epoch, for one rank (all of it a pure function of ``seed``, ``epoch``, ``rank``):

1. the split's shards are permuted (seeded by seed and epoch), giving one global record stream;
2. rank ``r`` of ``world_size`` takes every ``world_size``-th record of that stream starting at
   ``r``, so the ranks together see every record exactly once per epoch;
3. a shuffle buffer of ``shuffle_buffer`` record *positions* (seeded by seed, epoch and rank)
   reorders the rank's stream locally, differently each epoch.

The order is computed on record positions, and records are read by offset through the shards'
``.index`` files, so resuming at sample ``k`` costs only recomputing ``k`` positions: the state is
just ``{"epoch", "offset"}`` (samples of this rank's epoch already consumed).

DataLoader workers split the rank's stream into blocks of ``batch_size`` samples, dealt round-robin,
which is exactly the order an in-order DataLoader hands batches back in. So, with
``batch_size`` set to the loader's batch size, the batches come out in the same order for any number
of workers, and ``consumed samples`` maps back to a stream position. In the main process the
dataset's own counter only advances when it is iterated there (``num_workers=0``); with workers, use
:meth:`RecordDataset.loader` (a thin DataLoader wrapper that counts delivered batches) so that
``state_dict()`` stays exact.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Iterator
from functools import partial
from typing import IO, Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from minima.core.errors import ConfigError, InputError
from minima.data.records import tfrecord_io as tio

IGNORE_INDEX = -100
#: Shard files a reader keeps open at once (least recently used closed first). A shuffle buffer spans a
#: few neighbouring shards of the stream, so a handful suffices; thousands of shards would exhaust the
#: process's file descriptors (``ulimit -n``) if every shard stayed open for the epoch.
MAX_OPEN_SHARDS = 8


def split_files(records_dir: str, split: str) -> list[str]:
    """The sorted ``part-*.tfrecord`` files of a split (InputError when the split is missing)."""
    split_dir = tio.join(records_dir, split)
    if not tio.exists(split_dir):
        raise InputError(
            f"records split {split!r} not found: {split_dir}",
            fix="point at a records artifact (a dir with train/ and dev/) built by `minima records`",
        )
    return tio.glob(tio.join(split_dir, "part-*.tfrecord"))


def read_records_manifest(records_dir: str) -> dict:
    """The records artifact's manifest metrics ({} when there is no manifest, e.g. a bare dir)."""
    path = tio.join(records_dir, "manifest.json")
    if not tio.exists(path):
        return {}
    return json.loads(tio.read_text(path)).get("metrics", {})


_FORMAT_FIX = {
    "lm": "build these records with format=lm from pretraining text (chat records and their reply-only "
    "loss masks are for sft)",
    "chat": "build these records with format=chat (with a chat_format) from conversations",
}


def check_records_format(records_dir: Optional[str], want: str, what: str, fix: Optional[str] = None) -> None:
    """Stop ``what`` before it starts when its records are not ``format=want`` (a bare dir passes).

    Raises:
        ConfigError: naming the records, both formats and the fix.
    """
    if not records_dir:
        return
    got = read_records_manifest(records_dir).get("format")
    if got not in (None, want):
        raise ConfigError(
            f"{what} trains on format={want} records; {records_dir} holds format={got} records",
            where="records",
            fix=fix or _FORMAT_FIX.get(want),
        )


def to_sample(features: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Record features -> ``input_ids``, ``labels`` (-100 where mask == 0), ``attention_mask``.

    Trailing mask-0 tokens are padding (an ``lm`` split's last record) and get attention 0; a chat
    record always ends on a trained end-of-turn token, so its attention mask is all ones.
    """
    if "indices" not in features:  # other record kinds (preference pairs) keep their features by name
        return {k: torch.from_numpy(v) for k, v in features.items()}
    ids = torch.from_numpy(features["indices"])
    mask = features.get("mask")
    if mask is None:
        return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    m = torch.from_numpy(mask)
    labels = torch.where(m.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    nz = np.flatnonzero(mask)
    real = int(nz[-1]) + 1 if len(nz) else len(mask)
    attn = torch.zeros_like(ids)
    attn[:real] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def collate(batch: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples to the longest: ids with ``pad_id``, labels -100, attention 0."""
    if not batch:
        raise ValueError("collate got an empty batch")
    n = max(len(s["input_ids"]) for s in batch)
    out = {
        "input_ids": torch.full((len(batch), n), int(pad_id), dtype=torch.long),
        "labels": torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(batch), n), dtype=torch.long),
    }
    for i, s in enumerate(batch):
        k = len(s["input_ids"])
        for key in out:
            out[key][i, :k] = s[key]
    return out


def shuffle_buffer_order(stream: np.ndarray, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """Reorder ``stream`` as a streaming shuffle buffer of ``buffer_size`` slots would.

    Fill the buffer, then for each new element emit a random slot and put the element there;
    finally emit what is left in random order. ``buffer_size <= 1`` keeps the order.
    """
    n = len(stream)
    if buffer_size <= 1 or n <= 1:
        return stream.copy()
    b = min(buffer_size, n)
    buf = stream[:b].tolist()
    picks = rng.integers(0, b, size=n - b).tolist()
    out = np.empty(n, dtype=stream.dtype)
    rest = stream[b:].tolist()
    for t, (j, x) in enumerate(zip(picks, rest)):
        out[t] = buf[j]
        buf[j] = x
    out[n - b :] = np.array(buf, dtype=stream.dtype)[rng.permutation(b)]
    return out


class RecordDataset(IterableDataset):
    """Stream the records of one split of a records artifact, sharded and resumable.

    Args:
        records_dir: the records artifact (local, or gs:// / s3:// / hdfs:// with the tfio extra).
        split: ``"train"`` or ``"dev"``.
        rank: this process's data-parallel rank.
        world_size: number of data-parallel ranks.
        seed: base seed of the shard permutation and the shuffle buffer.
        shuffle_buffer: record positions in the shuffle buffer; 0 or 1 reads in file order (and
            keeps the shard order too).
        loop: run through epochs forever (epoch += 1 at the end of each).
        batch_size: the DataLoader batch size, for the per-worker block split (see module doc).
        verify_crc: check each record's CRC32C on read.

    Yields:
        dicts of LongTensors ``input_ids``, ``labels`` (-100 where the mask is 0),
        ``attention_mask``.
    """

    def __init__(
        self,
        records_dir: str,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 10000,
        loop: bool = False,
        batch_size: int = 1,
        verify_crc: bool = True,
    ):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        self.records_dir = str(records_dir)
        self.split = split
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle_buffer, self.loop = seed, shuffle_buffer, loop
        self.batch_size = batch_size
        self.verify_crc = verify_crc
        self.files = split_files(self.records_dir, split)
        indexes = [tio.read_index(f) for f in self.files]
        self._file_of = np.concatenate(
            [np.full(len(ix), i, dtype=np.int64) for i, ix in enumerate(indexes)] or [np.zeros(0, np.int64)]
        )
        self._entries = (
            np.concatenate(indexes or [np.zeros((0, 2), np.int64)]) if indexes else np.zeros((0, 2), np.int64)
        )
        self._file_starts = np.cumsum([0] + [len(ix) for ix in indexes])
        self.num_records = int(self._file_starts[-1])
        meta = read_records_manifest(self.records_dir)
        self.pad_id = int(meta.get("pad_id", 0))
        self.format = meta.get("format")
        if loop and self.num_records == 0:
            raise InputError(
                f"records split {split!r} of {self.records_dir} is empty; cannot loop over it",
                fix="build more records, lower dev_fraction's effect, or pass loop=False",
            )
        self.epoch = 0
        self.offset = 0
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._handles: OrderedDict[int, IO[bytes]] = OrderedDict()

    # ---------------------------------------------------------------------------- bookkeeping
    def samples_per_epoch(self) -> int:
        """Samples this rank yields per epoch (ranks differ by at most one)."""
        return len(range(self.rank, self.num_records, self.world_size))

    def __len__(self) -> int:
        if self.loop:
            raise TypeError("a looping RecordDataset has no length; use samples_per_epoch()")
        return self.samples_per_epoch()

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first sample (its shuffle differs from other epochs')."""
        self.epoch, self.offset = int(epoch), 0

    def state_dict(self) -> dict:
        """Position after the last consumed sample: ``{"epoch", "offset"}`` plus checks."""
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_records": self.num_records,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the last sample consumed when ``state`` was taken."""
        for key in ("seed", "world_size", "num_records", "shuffle_buffer"):
            if key in state and state[key] != getattr(self, key):
                raise ConfigError(
                    f"cannot resume the records reader: {key}={state[key]} in the checkpoint "
                    f"but {getattr(self, key)} now",
                    fix="resume with the same records, seed, shuffle_buffer and world size as the interrupted run",
                )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def advance(self, start_epoch: int, start_offset: int, consumed: int) -> None:
        """Set the state to ``consumed`` samples after (start_epoch, start_offset)."""
        per = self.samples_per_epoch()
        total = start_offset + consumed
        if per and total > per and self.loop:
            extra, total = divmod(total, per)
            if total == 0:  # exactly at an epoch end: keep it as (epoch, per) like iteration does
                extra, total = extra - 1, per
            start_epoch += extra
        self.epoch, self.offset = start_epoch, total

    # ----------------------------------------------------------------------------------- order
    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global record ids this rank reads in ``epoch``, in order."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        shuffle = self.shuffle_buffer > 1
        nfiles = len(self.files)
        perm = np.random.default_rng([self.seed, epoch]).permutation(nfiles) if shuffle else np.arange(nfiles)
        stream = np.concatenate(
            [np.arange(self._file_starts[i], self._file_starts[i + 1]) for i in perm] or [np.zeros(0, np.int64)]
        ).astype(np.int64)
        mine = stream[self.rank :: self.world_size]
        if shuffle:
            mine = shuffle_buffer_order(
                mine, self.shuffle_buffer, np.random.default_rng([self.seed, epoch, self.rank, 1])
            )
        self._order_cache = (epoch, mine)
        return mine

    # ------------------------------------------------------------------------------------ read
    def read(self, record_id: int) -> dict[str, torch.Tensor]:
        """One record by its global id, as a sample dict."""
        fi = int(self._file_of[record_id])
        offset, size = (int(x) for x in self._entries[record_id])
        f = self._handles.get(fi)
        if f is None:
            while len(self._handles) >= MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)[1].close()
            f = self._handles[fi] = tio.open_read(self.files[fi])
        else:
            self._handles.move_to_end(fi)
        f.seek(offset)
        where = f"{self.files[fi]} record {record_id - int(self._file_starts[fi])}"
        data = tio.unframe(f.read(size), where, self.verify_crc)
        return to_sample(tio.decode_example(data, where))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        per = self.samples_per_epoch()
        epoch, offset = self.epoch, self.offset
        if per and offset >= per:  # the saved epoch was finished: go on with the next one
            epoch, offset = epoch + 1, 0
        count = 0  # stream samples since this iteration started (all workers', for the block split)
        while True:
            order = self.epoch_order(epoch)
            for k in range(offset, len(order)):
                mine = (count // self.batch_size) % workers == worker
                count += 1
                # Every copy (main process or worker) tracks the stream position, so a persistent
                # worker starts the next epoch on its own.
                self.epoch, self.offset = epoch, k + 1
                if mine:
                    yield self.read(int(order[k]))
            if not self.loop:
                return
            epoch, offset = epoch + 1, 0

    def loader(self, batch_size: int, pad_id: Optional[int] = None, num_workers: int = 0, **kw: Any) -> RecordLoader:
        """A DataLoader over this dataset that keeps :meth:`state_dict` exact with workers."""
        return RecordLoader(self, batch_size, self.pad_id if pad_id is None else pad_id, num_workers, **kw)

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = OrderedDict()  # file objects do not cross into DataLoader workers
        return state

    def __del__(self) -> None:
        # A plain try rather than contextlib.suppress: __del__ can run at interpreter exit, after module globals
        # such as ``contextlib`` are torn down.
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass


class RecordLoader:
    """DataLoader wrapper that advances the dataset's state by the batches actually delivered."""

    def __init__(self, dataset: RecordDataset, batch_size: int, pad_id: int, num_workers: int = 0, **kw: Any):
        self.dataset = dataset
        dataset.batch_size = batch_size
        self.batch_size = batch_size
        self.dataloader = DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=partial(collate, pad_id=pad_id), **kw
        )

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        ds = self.dataset
        per = ds.samples_per_epoch()
        start_epoch, start_offset = ds.epoch, ds.offset
        if per and start_offset >= per:
            start_epoch, start_offset = start_epoch + 1, 0
        consumed = 0
        for batch in self.dataloader:
            consumed += int(batch["input_ids"].shape[0])
            ds.advance(start_epoch, start_offset, consumed)
            yield batch

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
