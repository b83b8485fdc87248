"""Records stage benchmark: build speed vs the raw tokenizer, worker scaling, reader speed vs a training
step, bytes per token. Writes its section of benchmarks/RESULTS.md.

    python benchmarks/records.py [--repeats 3] [--quick]

Every ratio is measured side by side in one run (the two sides interleaved, best of ``--repeats``),
so load from other processes on a shared machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one process = one core, on both sides
os.environ.setdefault("MINIMA_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("MINIMA_SHARED_DATA", ROOT.parent / "shared" / "data"))

from benchmarks.results import machine, write_section  # noqa: E402


def corpus(tmp: Path, quick: bool) -> tuple[list[Path], str, str]:
    """Bilingual real text (shared data) or the built-in demo corpus; and a tokenizer dir."""
    from minima.data import demo as demo_data
    from minima.data.tokenizers import save_sp_tokenizer
    from minima.testing import demo_tokenizer_dir

    scale = 4 if quick else 1
    if (SHARED / "text").is_dir() and (SHARED / "tokenizers" / "llama2_tokenizer.model").is_file():
        files = []
        for name, lines in (
            ("tinyshakespeare.txt", 40000),
            ("hongloumeng_prefix_1.5MB.txt", 3879),
            ("llamafactory_wiki_demo.txt", 30),
        ):
            data = (SHARED / "text" / name).read_bytes().splitlines(keepends=True)
            out = tmp / name
            out.write_bytes(b"".join(data[: lines // scale]))
            files.append(out)
        tok = save_sp_tokenizer(SHARED / "tokenizers" / "llama2_tokenizer.model", tmp / "llama2")
        return (
            files,
            str(tok),
            "tinyshakespeare + hongloumeng (prefix) + LLaMA-Factory wiki demo, LLaMA-2 tokenizer (32000)",
        )
    demo_data.write(tmp / "demo")
    tok = demo_tokenizer_dir(tmp / "tok", tmp / "demo")
    return sorted((tmp / "demo" / "text").glob("*.txt")), str(tok), "built-in demo corpus, demo tokenizer (1000)"


def docs_of(files: list[Path]) -> list[str]:
    out = []
    for f in files:
        for line in f.read_bytes().decode("utf-8").split("\n"):
            line = line[:-1] if line.endswith("\r") else line
            if line.strip():
                out.append(line)
    return out


def raw_tokenizer_tps(tok_dir: str, docs: list[str], batch: int) -> tuple[float, int]:
    """tokens/s of ``tokenizer(batch)`` alone, same text, same batching as the build."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    t = time.perf_counter()
    n = 0
    for i in range(0, len(docs), batch):
        n += sum(len(x) for x in tok(docs[i : i + batch], add_special_tokens=False)["input_ids"])
    return n / (time.perf_counter() - t), n


def build_tps(files, tok_dir: str, out: Path, workers: int, batch: int) -> dict:
    from minima.core.config import RecordsConfig, Source
    from minima.data.records.build import build_records

    cfg = RecordsConfig(
        inputs=[Source(name=f.stem, path=str(f)) for f in files],
        tokenizer=tok_dir,
        max_length=2048,
        num_workers=workers,
        chunk_size=batch,
        dev_fraction=0.01,
        out_dir=str(out),
    )
    c0, t = cpu_seconds(), time.perf_counter()
    m = build_records(cfg, out)
    wall, cpu = time.perf_counter() - t, cpu_seconds() - c0
    return {
        "wall": wall,
        "cpu": cpu,
        "tokens": m["total_tokens"],
        "tps": m["total_tokens"] / wall,
        "tok_tps": m["tokens_per_s"],
        "tok_per_cpu_s": m["total_tokens"] / cpu,
        "metrics": m,
    }


def cpu_seconds() -> float:
    """CPU time of this process plus its reaped children (the tokenizer pool)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def reader_tps(rec_dir: Path, seconds: float = 3.0) -> float:
    from minima.data.records import RecordDataset

    ds = RecordDataset(str(rec_dir), "train", shuffle_buffer=10000, loop=True)
    loader = ds.loader(batch_size=4)
    n, t = 0, time.perf_counter()
    for batch in loader:
        n += int(batch["attention_mask"].sum())
        if time.perf_counter() - t > seconds:
            break
    return n / (time.perf_counter() - t)


def train_step_tps(vocab: int, seq: int, batch: int = 4, steps: int = 6) -> float:
    """tokens/s a tiny model (hidden 128, 4 layers) consumes in full training steps (fwd+bwd+AdamW)."""
    import torch

    from minima.testing import tiny_llama

    model = tiny_llama(vocab, max_position_embeddings=seq).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (batch, seq))
    for i in range(steps + 1):
        if i == 1:
            t = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return batch * seq * steps / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a quarter of the text, one repeat, no RESULTS.md")
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    batch = 1024
    with tempfile.TemporaryDirectory(prefix="minima-bench-records-") as tmp:
        tmp = Path(tmp)
        files, tok_dir, what = corpus(tmp, args.quick)
        docs = docs_of(files)
        raw, b1, b2 = [], [], []
        for r in range(repeats):  # interleaved, so contention hits every side alike
            raw.append(raw_tokenizer_tps(tok_dir, docs, batch)[0])
            b1.append(build_tps(files, tok_dir, tmp / f"w1_{r}", 1, batch))
            b2.append(build_tps(files, tok_dir, tmp / f"w2_{r}", 2, batch))
        same = all(
            (tmp / "w1_0" / s / "part-00000.tfrecord").read_bytes()
            == (tmp / "w2_0" / s / "part-00000.tfrecord").read_bytes()
            for s in ("train", "dev")
        )
        best_raw = max(raw)
        best1 = max(b1, key=lambda x: x["tps"])
        best2 = max(b2, key=lambda x: x["tps"])
        m = best1["metrics"]
        rd, tr = [], []
        for _ in range(repeats):
            rd.append(reader_tps(tmp / "w1_0"))
            tr.append(train_step_tps(m["vocab_size"], 512))
        best_rd, best_tr = max(rd), max(tr)
        utf8 = sum(len(d.encode("utf-8")) + 1 for d in docs)
        rows = {
            "raw": best_raw,
            "b1": best1["tps"],
            "b1tok": best1["tok_tps"],
            "b2": best2["tps"],
            "b2tok": best2["tok_tps"],
            "rd": best_rd,
            "tr": best_tr,
        }
        rows.update(cpu1=best1["tok_per_cpu_s"], cpu2=best2["tok_per_cpu_s"], cores2=best2["cpu"] / best2["wall"])
        print({k: round(v, 2) for k, v in rows.items()}, "bytes/token", m["bytes_per_token"], "identical", same)
    if args.quick:
        return 0
    cores = os.cpu_count()
    load = os.getloadavg()[0]
    md = (
        "## records (`python benchmarks/records.py`)\n"
        "\n"
        f"Machine: {machine()}; {cores} cores, load average {load:.1f} at the end of the run "
        "(other jobs make absolute\n"
        f"numbers noisy); each ratio compares sides measured interleaved in one run (best of {repeats}).\n"
        f"Text: {what}; {len(docs):,} documents, {m['total_tokens']:,} tokens; `max_length=2048`, "
        f"`chunk_size={batch}`.\n"
        "\n"
        "| measure | value | target |\n"
        "|---|---|---|\n"
        f"| raw `tokenizer(batch)` tokens/s (1 process) | {best_raw:,.0f} | |\n"
        "| build tokens/s, 1 worker, end to end (read + mix + tokenize + pack + write) "
        f"| {best1['tps']:,.0f} (**{best1['tps'] / best_raw:.2f}x** raw) | >= 0.9x |\n"
        "| build tokens/s, 1 worker, tokenize + pack + write only "
        f"| {best1['tok_tps']:,.0f} (**{best1['tok_tps'] / best_raw:.2f}x** raw) | >= 0.9x |\n"
        "| build tokens/s, 2 workers, end to end "
        f"| {best2['tps']:,.0f} (**{best2['tps'] / best1['tps']:.2f}x** 1 worker) | near 2x |\n"
        "| build tokens/s, 2 workers, tokenize + pack + write only "
        f"| {best2['tok_tps']:,.0f} (**{best2['tok_tps'] / best1['tok_tps']:.2f}x** 1 worker) | near 2x |\n"
        "| build tokens per CPU-second, 2 workers vs 1 (parent + pool processes) "
        f"| {best2['tok_per_cpu_s']:,.0f} vs {best1['tok_per_cpu_s']:,.0f} "
        f"(**{best2['tok_per_cpu_s'] / best1['tok_per_cpu_s']:.2f}x**) | near 1x |\n"
        "| CPU cores the 2-worker build actually got (CPU-s / wall-s) "
        f"| {best2['cpu'] / best2['wall']:.2f} | 2 when free |\n"
        f"| output bytes identical, 1 vs 2 workers | {'yes' if same else 'NO'} | yes |\n"
        "| reader tokens/s (`RecordDataset` + `collate`, shuffle buffer 10k, batch 4, 1 process) "
        f"| {best_rd:,.0f} | |\n"
        "| tiny-model training step tokens/s (hidden 128, 4 layers, batch 4 x 512, fwd+bwd+AdamW) "
        f"| {best_tr:,.0f} | |\n"
        f"| reader / training consumption | **{best_rd / best_tr:.0f}x** | >= 20x |\n"
        "| bytes per token on disk (TFRecord + Example int64 varints, incl. framing) "
        f"| {m['bytes_per_token']:.2f} | |\n"
        f"| UTF-8 text bytes per token (same documents) | {utf8 / m['total_tokens']:.2f} | |\n"
        "\n"
        "Scaling from 1 to 2 workers can only approach 2x in wall time when two cores are free (load average\n"
        f"{load:.1f} on {cores} cores at the end of this run; "
        f"the 2-worker build got {best2['cpu'] / best2['wall']:.2f} cores, and on a\n"
        "2-core box the parent process that reads, packs and writes competes with the two workers). The CPU\n"
        "cost per token is what the code controls: "
        f"2 workers spend {best1['tok_per_cpu_s'] / best2['tok_per_cpu_s']:.2f}x "
        "the CPU-seconds of 1\n"
        "(pool start and teardown, result pickling; workers inherit the documents by fork and get only\n"
        "index ranges, results come back as flat int32 arrays), so with two cores free for the workers the\n"
        f"expected speed-up is about {2 * best2['tok_per_cpu_s'] / best1['tok_per_cpu_s']:.1f}x. The 1-worker\n"
        '"tokenize + pack + write" rate beats raw `tokenizer(batch)` because the build calls the Rust\n'
        "tokenizer's `encode_batch_fast` (no offsets, no Python `BatchEncoding`), checked equal to\n"
        "`tokenizer(...)` ids in tests/test_formats.py. On disk, an int64 varint takes 1 byte for ids < 128, 2\n"
        "below 16384 and 3 above; SentencePiece gives frequent pieces low ids, so the LLaMA-2 vocabulary\n"
        "averages about 2.3 bytes per token, and the per-record framing (16 bytes of length/CRC, about 20\n"
        "of feature keys) is negligible at 2048 tokens. A packed uint16 array would take 2 bytes but no\n"
        "TFRecord reader could parse it.\n"
    )
    write_section("records", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
