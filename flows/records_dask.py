"""Records builds fanned out over a Dask cluster (optional extra ``dask``: prefect-dask).

The flow reads and mixes the documents here, sends the tokenization chunks to Dask workers as Prefect
tasks, and writes the shards here in chunk order, so the files are byte-identical to a local build:

    records_dask([{...RecordsConfig fields...}, ...], address="tcp://scheduler:8786")

Without ``address`` a local Dask cluster of ``n_workers`` processes is started.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Optional

from prefect import flow, task, unmapped

from minima.core.config import RecordsConfig
from minima.data.records.build import tokenize_chunk
from minima.stages.records import run


@task(name="tokenize-chunk", retries=1)
def tokenize_chunk_task(tokenizer_dir: str, fields: dict, chunk: tuple) -> tuple:
    return tokenize_chunk(tokenizer_dir, fields, chunk)


def _dask_mapper(tokenizer_dir: str, fields: dict, chunks: Iterable[tuple]) -> Iterator[tuple]:
    futures = tokenize_chunk_task.map(unmapped(tokenizer_dir), unmapped(fields), list(chunks))
    for f in futures:  # in submission order: the writer depends on it
        yield f.result()


def records_dask(
    configs: list[dict], force: bool = False, address: Optional[str] = None, n_workers: int = 2
) -> list[dict]:
    """Build records artifacts (one per RecordsConfig dict, in turn) with tokenization on one Dask
    cluster; returns each artifact's path and metrics."""
    from prefect_dask import DaskTaskRunner

    runner = (
        DaskTaskRunner(address=address)
        if address
        else DaskTaskRunner(
            cluster_kwargs={
                "n_workers": n_workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            }
        )
    )

    @flow(name="minima-records-dask", task_runner=runner)
    def _flow(configs: list[dict], force: bool) -> list[dict]:
        out = []
        for config in configs:
            art = run(RecordsConfig.model_validate(config), force=force, mapper=_dask_mapper)
            out.append({"path": str(art.path), "skipped": art.skipped, "metrics": art.metrics})
        return out

    return _flow(list(configs), force)
