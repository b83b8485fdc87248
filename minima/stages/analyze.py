"""``minima analyze records=<dir> [model=<dir>]``: what each source of a records build contributes.

Per source (chat records carry their source's index; lm records, packed across documents, are
reported as one ``all`` source next to the manifest's per-source token counts):

- records and tokens; instruction tokens (loss mask 0: system, user turns, markup) and output tokens
  (mask 1: the replies and their end-of-turn token);
- the instruction/output length ratio, over the source's totals and as the mean of the per-record
  ratios (Instruction Modelling finds that loss on instructions helps most where this ratio is high);
- with ``model``: the model's mean loss per source, token-weighted, on the output tokens (``loss``, the
  sft loss) and on every token after the first (``loss_all``, the instruction-modelling loss).

Writes ``analyze.json`` and ``analyze.png`` into ``out_dir`` (default: ``<records>_analyze`` beside the
records dir), each replaced atomically.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
from pydantic import Field

from minima.core.artifacts import atomic_write_text
from minima.core.config import Closed, command_config
from minima.core.errors import InputError
from minima.core.logs import get_logger
from minima.data.records import tfrecord_io as tio
from minima.data.records.reader import collate, read_records_manifest, split_files, to_sample

log = get_logger("minima.analyze")


class AnalyzeConfig(Closed):
    """Settings of ``minima analyze`` (key=value)."""

    records: str = Field(..., description="A records artifact dir (built by `minima records`).")
    model: Optional[str] = Field(None, description="A model dir: adds the mean loss per source.")
    out_dir: Optional[str] = Field(
        None, description="Where analyze.json and analyze.png go (default <records>_analyze)."
    )
    splits: list[str] = Field(["train", "dev"], description="Record splits to read (a missing dev split is skipped).")
    max_records: Optional[int] = Field(None, ge=1, description="Per source, analyse at most this many records.")
    batch_size: int = Field(8, ge=1, description="Records per forward pass (with model).")
    device: str = Field("auto", description="Device for the model: auto, cpu, cuda, cuda:N.")
    dtype: str = Field("fp32", description="Model dtype for the loss: fp32, bf16, fp16, auto.")


def iter_records(records_dir: str, split: str):
    """Every record's features in a split, in file order."""
    for path in split_files(records_dir, split):
        with tio.open_read(path) as f:
            for i, entry in enumerate(tio.iter_entries(f, path)):
                yield tio.decode_example(entry, f"{path} record {i}")


def _source_names(manifest: dict) -> list[str]:
    names = manifest.get("source_names")
    if names:
        return list(names)
    return list(manifest.get("sources") or {})


def collect(cfg: AnalyzeConfig) -> tuple[dict[str, list[dict]], dict]:
    """Records grouped by source name (``all`` when records carry no source), and the manifest metrics."""
    manifest = read_records_manifest(cfg.records)
    names = _source_names(manifest)
    groups: dict[str, list[dict]] = {}
    found = False
    for split in cfg.splits:
        try:
            files = split_files(cfg.records, split)
        except InputError:
            if split == "train":
                raise
            continue
        found = found or bool(files)
        for feats in iter_records(cfg.records, split):
            if "indices" not in feats:
                raise InputError(
                    "these records hold preference pairs; analyze reads lm or chat records",
                    where=cfg.records,
                    fix="point records= at an lm or chat records build",
                )
            src = feats.get("source")
            name = names[int(src[0])] if src is not None and int(src[0]) < len(names) else "all"
            bucket = groups.setdefault(name, [])
            if cfg.max_records is None or len(bucket) < cfg.max_records:
                bucket.append(feats)
    if not found:
        raise InputError(f"no records in {cfg.records}", where=cfg.records, fix="build them with `minima records`")
    order = {n: i for i, n in enumerate(names)}
    return dict(sorted(groups.items(), key=lambda kv: order.get(kv[0], len(order)))), manifest


def length_stats(records: list[dict], chat: bool) -> dict[str, Any]:
    """Token counts of one source's records and its instruction/output length ratio (chat records)."""
    tokens = instr = out = 0
    ratios = []
    for r in records:
        mask = r.get("mask")
        n = len(r["indices"])
        if not chat:  # lm: every real token is trained; the tail record's padding is mask 0 at the end
            real = int(mask.sum()) if mask is not None else n
            tokens += real
            continue
        o = int(mask.sum())
        tokens, instr, out = tokens + n, instr + n - o, out + o
        if o:
            ratios.append((n - o) / o)
    stats: dict[str, Any] = {"records": len(records), "tokens": tokens}
    if chat:
        stats.update(
            instruction_tokens=instr,
            output_tokens=out,
            mean_instruction_tokens=round(instr / len(records), 4) if records else 0.0,
            mean_output_tokens=round(out / len(records), 4) if records else 0.0,
            length_ratio=round(instr / out, 6) if out else None,
            mean_record_ratio=round(float(np.mean(ratios)), 6) if ratios else None,
        )
    return stats


def source_losses(model: Any, records: list[dict], batch_size: int, pad_id: int) -> dict[str, float]:
    """Token-weighted mean cross entropy of one source's records: on output tokens and on all tokens."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    sums = {"loss": 0.0, "loss_all": 0.0}
    counts = {"loss": 0, "loss_all": 0}
    with torch.no_grad():
        for i in range(0, len(records), batch_size):
            batch = collate([to_sample(r) for r in records[i : i + batch_size]], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            logits, ids = logits[:, :-1], batch["input_ids"][:, 1:]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none").view_as(ids)
            out_mask = batch["labels"][:, 1:] != -100
            all_mask = batch["attention_mask"][:, 1:].bool()
            for key, m in (("loss", out_mask), ("loss_all", all_mask)):
                sums[key] += float(ce[m].double().sum())
                counts[key] += int(m.sum())
    return {k: round(sums[k] / counts[k], 6) if counts[k] else None for k in sums}


def plot(result: dict, path: Path) -> None:
    """Bars per source: tokens, instruction/output ratio, and loss when measured; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = result["sources"]
    names = list(per)
    panels = [("tokens", "tokens")]
    if any(per[n].get("length_ratio") is not None for n in names):
        panels.append(("length_ratio", "instruction / output tokens"))
    if any(per[n].get("loss") is not None for n in names):
        panels.append(("loss", "mean loss (output tokens)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        ax.bar(names, [per[n].get(key) or 0 for n in names], color="tab:blue")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def analyze(cfg: AnalyzeConfig) -> dict:
    """Analyse ``cfg.records`` (and the model's loss on it); writes analyze.json + analyze.png, returns the result."""
    groups, manifest = collect(cfg)
    has_mask = any("source" in r or "mask" in r for g in groups.values() for r in g[:1])
    chat = manifest.get("format", "chat" if has_mask else "lm") == "chat"
    result: dict[str, Any] = {
        "records": str(cfg.records),
        "format": "chat" if chat else "lm",
        "splits": cfg.splits,
        "sources": {name: length_stats(recs, chat) for name, recs in groups.items()},
    }
    if not chat and manifest.get("sources"):
        result["manifest_tokens"] = {n: s.get("tokens_after") for n, s in manifest["sources"].items()}
    if cfg.model:
        from minima.models.loader import load_model

        model = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
        if getattr(model.config, "is_encoder_decoder", False):
            raise InputError(
                "analyze measures a causal LM's loss; this model is encoder-decoder",
                where=cfg.model,
                fix="leave model= out, or pass a causal LM",
            )
        rows = model.get_input_embeddings().weight.shape[0]
        top = manifest.get("max_token_id")
        if top is not None and top >= rows:
            raise InputError(
                f"the records use token id {top} but the model has {rows} embedding rows",
                where=cfg.model,
                fix="analyze with the model whose tokenizer built the records",
            )
        pad = manifest.get("pad_id", 0) or 0
        result["model"] = str(cfg.model)
        for name, recs in groups.items():
            result["sources"][name].update(source_losses(model, recs, cfg.batch_size, pad))
    out = Path(cfg.out_dir) if cfg.out_dir else Path(str(cfg.records).rstrip("/") + "_analyze")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "analyze.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    plot(result, out / "analyze.png")
    result["out_dir"] = str(out)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    """``minima analyze records=DIR [model=DIR] [out_dir=DIR] ...``"""
    cfg = command_config(AnalyzeConfig, argv, __doc__)
    if cfg is None:
        return 0
    res = analyze(cfg)
    for name, s in res["sources"].items():
        parts = [f"{s['records']} records", f"{s['tokens']} tokens"]
        if s.get("length_ratio") is not None:
            parts.append(f"instruction/output {s['length_ratio']:.3g}")
        if s.get("loss") is not None:
            parts.append(f"loss {s['loss']:.4f}")
        print(f"analyze: {name}: " + ", ".join(parts))
    print(f"analyze: -> {res['out_dir']}/analyze.json, analyze.png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
