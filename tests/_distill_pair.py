"""What the distill tests share about their (teacher, student, records) setup tuple: a config, a one-process
train context and a first batch of the records with a masked prefix."""

from __future__ import annotations

from pathlib import Path

import torch

from minima.core.config import DistillConfig


def distill_cfg(setup, **kw) -> DistillConfig:
    """A 4-step fp32 distill config of ``setup = (dir, teacher, student, records)``, ``kw`` on top."""
    _, teacher, student, rec = setup
    base = dict(
        teacher=str(teacher),
        student=str(student),
        records=str(rec),
        precision="fp32",
        zero_stage=0,
        micro_batch_size=4,
        max_steps=4,
        lr=1e-3,
        log_steps=1,
    )
    base.update(kw)
    return DistillConfig.model_validate(base)


def one_process_ctx():
    from minima.train import TrainContext

    return TrainContext(0, 1, 0, torch.device("cpu"), torch.float32, Path("."), Path("."), 0)


def first_batch(setup, n=3):
    """The first ``n`` train records, collated; the first row's first 10 labels masked, as chat records have."""
    from minima.data.records import RecordDataset, collate

    ds = RecordDataset(str(setup[3]), "train", shuffle_buffer=0)
    batch = collate([ds.read(i) for i in range(n)])
    batch["labels"][0, :10] = -100
    return batch
