"""Records: tokenize text/chat sources once into TFRecord shards, and stream them back for training.

Part of minima.data: may import minima.core only.

- ``minima records`` (:func:`minima.stages.records.run`) builds an artifact:
  ``train/part-NNNNN.tfrecord`` (+ ``.index``), ``dev/...``, a ``tokenizer/`` copy, and a manifest
  with per-source counts, token totals, drops/skips and bytes per token.
- :class:`RecordDataset` + :func:`collate` read it for the training engine: sharded by rank and
  DataLoader worker, seeded shuffle buffer per epoch, exact resume via ``state_dict()``.

Reader usage::

    ds = RecordDataset(records_dir, "train", rank=rank, world_size=world, seed=seed, loop=True)
    loader = ds.loader(batch_size=4, num_workers=2)     # or DataLoader(ds, 4, collate_fn=collate)
    for batch in loader: ...                            # input_ids, labels (-100 = no loss), attention_mask
    ckpt["data"] = ds.state_dict(); ...; ds.load_state_dict(ckpt["data"])

Remote file systems: ``records_dir`` may be ``gs://``, ``s3://`` or ``hdfs://`` when tensorflow (and
tensorflow-io for s3/hdfs) is importable; files are then read through ``tf.io.gfile``. TensorFlow
pins numpy/protobuf ranges of its own, so install the ``tfio`` extra in a separate environment
(``python -m venv .venv-tfio && .venv-tfio/bin/pip install -e '.[tfio]'``) and run the training
job from it; the default environment never imports tensorflow. Builds write locally (the artifact
is published by an atomic rename); copy the finished dir to the bucket afterwards. The records are
standard TFRecords: ``tf.data.TFRecordDataset`` reads them (``indices``/``mask`` int64 features).
"""

from __future__ import annotations

from minima.data.records.reader import (
    IGNORE_INDEX,
    RecordDataset,
    RecordLoader,
    collate,
    read_records_manifest,
)

__all__ = ["IGNORE_INDEX", "RecordDataset", "RecordLoader", "collate", "read_records_manifest", "build_records"]


def __getattr__(name: str):
    # The builder pulls in transformers; keep `from minima.data.records import RecordDataset` light.
    if name == "build_records":
        from minima.data.records import build

        return getattr(build, name)
    raise AttributeError(name)
