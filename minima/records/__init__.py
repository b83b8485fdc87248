"""Stable import path for the record reader: ``from minima.records import RecordDataset, collate``.

The implementation lives in :mod:`minima.data.records`.
"""

from minima.data.records import IGNORE_INDEX, RecordDataset, RecordLoader, collate, read_records_manifest

__all__ = ["IGNORE_INDEX", "RecordDataset", "RecordLoader", "collate", "read_records_manifest"]
