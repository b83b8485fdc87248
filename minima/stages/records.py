"""Stage records: build TFRecord shards (packed LM text or chat with loss masks) into an artifact.

The building itself lives in :mod:`minima.data.records.build`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from minima.core.artifacts import Artifact, run_stage
from minima.core.config import RecordsConfig
from minima.core.errors import ConfigError, InputError
from minima.data.records.build import ChunkMapper, build_records, sources_of, special_ids
from minima.data.records.inputs import resolve_files
from minima.data.tokenizers import load_tokenizer


def run(cfg: RecordsConfig, force: bool = False, mapper: Optional[ChunkMapper] = None) -> Artifact:
    """Build (or reuse) the records artifact for ``cfg``.

    ``mapper`` fans the tokenization chunks out elsewhere (flows/records_dask.py: a Dask cluster);
    chunks are consumed in order, so the files are the same bytes as a local build."""
    sources = sources_of(cfg)
    if cfg.tokenizer is None:
        raise ConfigError(
            "records needs a tokenizer", where="RecordsConfig.tokenizer", fix="set tokenizer to an HF tokenizer dir"
        )
    if not Path(cfg.tokenizer).is_dir():
        raise InputError(
            f"tokenizer directory not found: {cfg.tokenizer}",
            fix="point tokenizer at an HF tokenizer dir (e.g. the vocab stage output)",
        )
    special_ids(load_tokenizer(cfg.tokenizer), cfg)  # an unreadable tokenizer or one without EOS stops here
    if cfg.format == "chat":
        from minima.data.formats import get_format

        get_format(cfg.chat_format)
    for s in sources:
        resolve_files(s.path)  # fail before any work when a glob matches nothing
    inputs = {"tokenizer": str(cfg.tokenizer), **{f"source:{s.name}": s.path for s in sources}}
    return run_stage(cfg, inputs, body=lambda r: _body(cfg, r.work_dir, mapper), force=force)


def _body(cfg: RecordsConfig, work_dir: Path, mapper: Optional[ChunkMapper] = None) -> dict:
    try:
        return build_records(cfg, work_dir, mapper)
    except BaseException:
        # run_stage publishes only on success; drop the partial dir so nothing half-written remains.
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
