"""Reading preference records back: :class:`PreferenceDataset` and :func:`collate_pairs`.

A ``format=preference`` record holds ``prompt``, ``chosen`` + ``chosen_mask`` and ``rejected`` +
``rejected_mask`` (int64 features). :class:`PreferenceDataset` is a :class:`RecordDataset` (same
order, sharding and exact ``state_dict()`` resume) whose samples carry these fields and ``index``,
the record's global id in the split. Per-pair side data (precomputed reference log-probs) rides
along as ``extras``: arrays indexed by that id, each sample carrying its row.

:func:`collate_pairs` lays a batch of B pairs out as one forward of 2B rows, the chosen rows first:
``prompt + chosen`` and ``prompt + rejected``, right-padded, with labels on the responses' masked
tokens.
"""

from __future__ import annotations

from typing import Optional

import torch

from minima.core.errors import DataError, InputError
from minima.data.records.reader import IGNORE_INDEX, RecordDataset

PAIR_FIELDS = ("prompt", "chosen", "chosen_mask", "rejected", "rejected_mask")


class PreferenceDataset(RecordDataset):
    """A :class:`RecordDataset` of preference pairs (see the module docstring).

    Args: those of :class:`RecordDataset`, plus ``extras``: name -> array with one row per record of
    the split, added to each sample under that name.
    """

    def __init__(self, records_dir: str, split: str = "train", extras: Optional[dict] = None, **kw):
        super().__init__(records_dir, split, **kw)
        self.extras = dict(extras or {})
        for name, arr in self.extras.items():
            if len(arr) != self.num_records:
                raise DataError(
                    f"{name} has {len(arr)} rows but split {split!r} has {self.num_records} records",
                    where=records_dir,
                    fix="rebuild the side data from these records",
                )
        if self.format not in (None, "preference"):
            raise InputError(
                f"{records_dir} holds format={self.format} records, not preference pairs",
                fix="build them with `minima records format=preference ...`",
            )

    def read(self, record_id: int) -> dict:
        raw = super().read(record_id)
        missing = [k for k in PAIR_FIELDS if k not in raw]
        if missing:
            raise DataError(
                f"record {record_id} of split {self.split!r} has no {', '.join(missing)}",
                where=self.records_dir,
                fix="build preference records with `minima records format=preference ...`",
            )
        out = {k: raw[k] for k in PAIR_FIELDS}
        out["index"] = torch.tensor(record_id, dtype=torch.long)
        for name, arr in self.extras.items():
            out[name] = torch.as_tensor(arr[record_id])
        return out


def collate_pairs(batch: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """B pairs -> ``input_ids``, ``attention_mask``, ``labels`` of 2B rows (chosen rows, then rejected), ``index``
    and each extra field stacked over the pairs.

    Labels are the response tokens whose mask is 1 (-100 elsewhere), so ``labels[:, 1:]`` marks the
    positions whose log-probability a response's score sums.
    """
    if not batch:
        raise ValueError("collate_pairs got an empty batch")
    rows = []
    for side in ("chosen", "rejected"):
        for b in batch:
            p, r, m = b["prompt"].long(), b[side].long(), b[f"{side}_mask"].long()
            rows.append((torch.cat([p, r]), torch.cat([torch.zeros_like(p), m])))
    n = max(len(ids) for ids, _ in rows)
    out = {
        "input_ids": torch.full((len(rows), n), int(pad_id), dtype=torch.long),
        "attention_mask": torch.zeros((len(rows), n), dtype=torch.long),
        "labels": torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long),
    }
    for i, (ids, mask) in enumerate(rows):
        k = len(ids)
        out["input_ids"][i, :k] = ids
        out["attention_mask"][i, :k] = 1
        out["labels"][i, :k] = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    for key in batch[0]:
        if key not in PAIR_FIELDS:
            out[key] = torch.stack([torch.as_tensor(b[key]) for b in batch])
    return out
