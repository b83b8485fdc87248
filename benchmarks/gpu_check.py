"""The GPU checks, one prepared run: every figure the scale path needs, on one GPU, with no downloads.

``bash benchmarks/gpu_check.sh`` (this file does the work) prints one line per figure,
``gpu_check <arm>: <figure> = <value>``, and writes the ``gpu`` section of benchmarks/RESULTS.md.
Every model is random and built here; the data is minima's built-in demo corpus. Arms:

1. ``train``: adapt through the engine (torchrun, DeepSpeed ZeRO-3, bf16, activation checkpointing,
   seq 4096, vocab 49216) on a reduced-depth 7B-shaped Llama loaded with ``from_pretrained``:
   tok/s, MFU, peak memory against ``minima plan``'s prediction.
2. ``distill``: distillation from that model (online teacher) against the same student with
   ``loss.alpha=1`` (no teacher): step-time ratio and peak memory; a ``teacher_zero3`` smoke run.
3. ``sft``: LoRA against full fine-tuning at one shape (tok/s, peak memory); QLoRA (when
   bitsandbytes is installed) and FSDP2 smoke runs whose exports reload.
4. ``evaluate``: loglikelihood items/s, generation tokens/s, perplexity peak memory at 32 x 4096.
5. ``checkpoint``: save and resume time, and a SIGKILLed run resumed bitwise.
6. ``serve``: ``minima serve`` time to first token and streamed tokens/s.

``--cpu-smoke`` runs every arm at toy size on CPU (a few minutes at most; the test suite runs it), so
the script cannot rot before a GPU is there. A time budget (``--budget-s``, 8 minutes on GPU) skips
what would not fit, saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("train", "distill", "sft", "evaluate", "checkpoint", "serve")


@dataclass
class Sizes:
    """Shapes and lengths of one mode."""

    teacher: dict  # the 7B-shaped, reduced-depth model of arm 1 (also the distill teacher)
    student: dict  # distill student and sft model
    vocab: int  # teacher/student vocab (0: the demo tokenizer's)
    seq: int
    steps: int
    ppl_batch: int
    ppl_window: int
    gen_tokens: int


GPU = Sizes(
    teacher=dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=32
    ),
    student=dict(
        hidden_size=2048, intermediate_size=5504, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16
    ),
    vocab=49216,
    seq=4096,
    steps=10,
    ppl_batch=32,
    ppl_window=4096,
    gen_tokens=128,
)
SMOKE = Sizes(
    teacher=dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4
    ),
    student=dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3
    ),
    vocab=0,
    seq=64,
    steps=3,
    ppl_batch=4,
    ppl_window=64,
    gen_tokens=8,
)


class Check:
    """Shared state of one gpu_check run: where things are, the figures so far, the deadline."""

    def __init__(self, work: Path, smoke: bool, budget_s: float):
        self.work, self.smoke, self.size = work, smoke, SMOKE if smoke else GPU
        self.deadline = time.time() + budget_s
        self.rows: list[tuple[str, str, str]] = []
        self.models: dict[str, Path] = {}

    def figure(self, arm: str, name: str, value) -> None:
        text = value if isinstance(value, str) else f"{value:,.4g}" if isinstance(value, float) else str(value)
        print(f"gpu_check {arm}: {name} = {text}", flush=True)
        self.rows.append((arm, name, text))

    @property
    def left_s(self) -> float:
        return self.deadline - time.time()

    def out(self, name: str) -> str:
        return str(self.work / "runs" / name)

    def common(self) -> dict:
        """Training settings every arm shares (bf16 on GPU; fp32, small and short on CPU)."""
        return dict(
            precision="fp32" if self.smoke else "bf16",
            max_steps=self.size.steps,
            micro_batch_size=1 if not self.smoke else 2,
            lr=1e-4,
            warmup_proportion=0.0,
            log_steps=1,
        )


# ------------------------------------------------------------------------------------------ setup
def setup(c: Check) -> None:
    """Demo corpus, its tokenizer, lm and chat records, and the random models (saved bf16 on GPU)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from minima.core.config import RecordsConfig
    from minima.data import demo
    from minima.stages.records import run as build_records
    from minima.testing import demo_tokenizer_dir

    data = c.work / "demo_data"
    demo.write(data)
    tok_dir = demo_tokenizer_dir(c.work / "tokenizer", data)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    c.models["tokenizer"] = tok_dir
    c.data = data
    rec = dict(tokenizer=str(tok_dir), dev_fraction=0.05)
    c.lm_records = build_records(
        RecordsConfig(
            inputs=[
                {"name": n, "path": str(p)} for n, p in ((p.stem, p) for p in sorted((data / "text").glob("*.txt")))
            ],
            format="lm",
            max_length=c.size.seq,
            out_dir=c.out("records_lm"),
            **rec,
        )
    ).path
    c.chat_records = build_records(
        RecordsConfig(
            inputs=str(data / "chat" / "demo_chat.json"),
            format="chat",
            chat_format="minichat",
            max_length=min(c.size.seq, 512),
            out_dir=c.out("records_chat"),
            **rec,
        )
    ).path
    vocab = c.size.vocab or len(tok)
    dtype = torch.float32 if c.smoke else torch.bfloat16
    for name, shape, v in (
        ("teacher", c.size.teacher, vocab),
        ("student", c.size.student, vocab),
        ("sft_base", c.size.student, len(tok)),
    ):
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=v,
            max_position_embeddings=max(c.size.seq, 4096),
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            **shape,
        )
        d = c.work / "models" / name
        LlamaForCausalLM(cfg).to(dtype).save_pretrained(str(d))
        if name == "sft_base":
            tok.save_pretrained(str(d))
        c.models[name] = d


def _metrics(out: str) -> tuple[dict, list[dict]]:
    from minima.train.metrics import read_metrics

    m = json.loads((Path(out) / "manifest.json").read_text())["metrics"]
    rows = [r for r in read_metrics(Path(out) / "metrics.jsonl") if r["split"] == "train"]
    return m, rows


def _steady(rows: list[dict], key: str) -> float:
    """Median of ``key`` over the steps after the first (start-up, allocator and kernel warm-up)."""
    vals = [r[key] for r in rows[1:] if r.get(key) is not None] or [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else float("nan")


# ------------------------------------------------------------------------------------------- arms
def arm_train(c: Check) -> None:
    from minima.core.config import AdaptConfig
    from minima.stages.adapt import run
    from minima.train.plan import PlanOptions, plan_stage

    cfg = AdaptConfig(
        model=str(c.models["teacher"]),
        records=str(c.lm_records),
        out_dir=c.out("train"),
        zero_stage=3,
        activation_checkpointing=True,
        **c.common(),
    )
    run(cfg, force=True)
    m, rows = _metrics(cfg.out_dir)
    c.figure("train", f"tokens/s (ZeRO-3, ckpt, seq {c.size.seq})", _steady(rows, "tok_s"))
    if any("mfu" in r for r in rows):
        c.figure("train", "MFU", _steady(rows, "mfu"))
    opts = PlanOptions(device="cpu" if c.smoke else "h100-80g", gpus=1)
    predicted = plan_stage(cfg, opts).total_bytes / 2**30
    c.figure("train", "plan predicted peak GiB", predicted)
    if "peak_memory_gib" in m:
        c.figure("train", "measured peak GiB", m["peak_memory_gib"])
        c.figure("train", "measured / predicted", m["peak_memory_gib"] / predicted)


def arm_distill(c: Check) -> None:
    from minima.core.config import DistillConfig
    from minima.stages.distill import run

    base = dict(teacher=str(c.models["teacher"]), student=str(c.models["student"]), records=str(c.lm_records))
    got = {}
    for name, loss in (("kd", {"alpha": 0.5}), ("ce", {"alpha": 1.0})):
        cfg = DistillConfig(out_dir=c.out(f"distill_{name}"), loss=loss, zero_stage=2, **base, **c.common())
        run(cfg, force=True)
        got[name] = _metrics(cfg.out_dir)
    kd, ce = (_steady(got[k][1], "step_time") for k in ("kd", "ce"))
    c.figure("distill", "step time online teacher / alpha=1 (no teacher)", kd / ce)
    for k in ("kd", "ce"):
        if "peak_memory_gib" in got[k][0]:
            c.figure(
                "distill", f"peak GiB ({'online teacher' if k == 'kd' else 'alpha=1'})", got[k][0]["peak_memory_gib"]
            )
    smoke = dict(c.common(), max_steps=2)
    cfg = DistillConfig(
        out_dir=c.out("distill_z3"), loss={"alpha": 0.5}, teacher_zero3=True, zero_stage=3, **base, **smoke
    )
    run(cfg, force=True)
    c.figure("distill", "teacher_zero3 smoke", f"ok, loss {_metrics(cfg.out_dir)[1][-1]['loss']:.4g}")


def _reload(out: str, records: Path) -> float:
    """Load an exported dir like a user would and return its loss on one dev batch (finite = it works)."""
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from minima.data.records import RecordDataset, collate

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ds = RecordDataset(str(records), "dev", shuffle_buffer=0)
    batch = collate([ds.read(i) for i in range(min(2, ds.num_records))], ds.pad_id)
    with torch.no_grad():
        loss = float(model(input_ids=batch["input_ids"], labels=batch["labels"]).loss)
    assert math.isfinite(loss), f"{out}: loss {loss}"
    return loss


def arm_sft(c: Check) -> None:
    import torch

    from minima.core.config import SftConfig
    from minima.stages.sft import run

    base = dict(model=str(c.models["sft_base"]), records=str(c.chat_records), max_length=min(c.size.seq, 512))
    got = {}
    for name, extra in (("full", {}), ("lora", {"lora": {"enabled": True, "r": 16}})):
        cfg = SftConfig(out_dir=c.out(f"sft_{name}"), zero_stage=2, **base, **extra, **c.common())
        run(cfg, force=True)
        got[name] = _metrics(cfg.out_dir)
    c.figure("sft", "tokens/s LoRA / full", _steady(got["lora"][1], "tok_s") / _steady(got["full"][1], "tok_s"))
    for k in ("full", "lora"):
        if "peak_memory_gib" in got[k][0]:
            c.figure("sft", f"peak GiB ({k})", got[k][0]["peak_memory_gib"])
    smoke = dict(c.common(), max_steps=2)
    fsdp_precision = "fp32" if c.smoke else "bf16"
    cfg = SftConfig(out_dir=c.out("sft_fsdp"), strategy="fsdp", **base, **dict(smoke, precision=fsdp_precision))
    run(cfg, force=True)
    c.figure("sft", "FSDP2 smoke, export reload dev loss", _reload(cfg.out_dir, c.chat_records))
    try:
        import bitsandbytes  # noqa: F401

        has_bnb = torch.cuda.is_available()
    except ImportError:
        has_bnb = False
    if not has_bnb:
        c.figure("sft", "QLoRA smoke", "skipped (needs bitsandbytes and a GPU)")
        return
    cfg = SftConfig(out_dir=c.out("sft_qlora"), lora={"enabled": True, "qlora": True}, **base, **smoke)
    run(cfg, force=True)
    c.figure("sft", "QLoRA smoke, export reload dev loss", _reload(cfg.out_dir, c.chat_records))


def arm_evaluate(c: Check) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minima.evaluate.core import evaluate_model
    from minima.evaluate.lm import LM

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(c.models["sft_base"]), dtype=dtype).to(dev).eval()
    tok = AutoTokenizer.from_pretrained(str(c.models["tokenizer"]))
    limit = 20 if c.smoke else 200
    t0 = time.time()
    evaluate_model(model, tok, {"demo_mc": {"path": str(c.data / "eval" / "demo_mc"), "limit": limit}}, batch_size=16)
    c.figure("evaluate", "loglikelihood items/s (demo_mc)", limit / (time.time() - t0))
    lm = LM(model, tok, batch_size=8)
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(8)]
    ids, mask = lm._left_pad([lm.tok_encode(p) for p in prompts], lm.pad_id, dev)
    t0 = time.time()
    with torch.inference_mode():
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=c.size.gen_tokens,
            do_sample=False,
            pad_token_id=lm.pad_id,
        )
    new = (gen.shape[1] - ids.shape[1]) * gen.shape[0]
    c.figure("evaluate", "generation tokens/s (batch 8, greedy)", new / (time.time() - t0))
    b, w = c.size.ppl_batch, c.size.ppl_window
    g = torch.Generator().manual_seed(0)
    text_ids = torch.randint(3, len(tok), (b * w // 2 + 1,), generator=g).tolist()
    lm_ppl = LM(model, tok, batch_size=b, max_length=w)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t0 = time.time()
    lm_ppl.rolling_nll(text_ids, window=w, stride=w // 2)
    c.figure("evaluate", f"perplexity {b} x {w} seconds", time.time() - t0)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - before) / 2**30
        full = b * w * model.config.vocab_size * 4 * 2 / 2**30  # fp32 logits + log-softmax of the whole batch
        c.figure("evaluate", f"perplexity {b} x {w} peak GiB (whole-batch log-softmax would be {full:.1f})", peak)


CKPT_DRIVER = """import json, sys
from minima.core.config import AdaptConfig
from minima.stages.adapt import run
run(AdaptConfig.model_validate(json.loads(open(sys.argv[1]).read())))
"""


def arm_checkpoint(c: Check) -> None:
    from safetensors.torch import load_file

    from minima.core.config import AdaptConfig
    from minima.stages.adapt import run

    steps = max(4, c.size.steps)
    kw = dict(c.common(), max_steps=steps, save_steps=2, keep_last=2, zero_stage=2)
    kw["precision"] = "fp32"  # bitwise resume is a property of the fp32 master state
    base = dict(model=str(c.models["student"]), records=str(c.lm_records), **kw)
    ref = AdaptConfig(out_dir=c.out("ckpt_ref"), **base)
    run(ref, force=True)
    cfg = AdaptConfig(out_dir=c.out("ckpt_killed"), **base)
    (c.work / "ckpt.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    (c.work / "ckpt_driver.py").write_text(CKPT_DRIVER)
    env = dict(os.environ, MINIMA_STEP_DELAY_S="0.5", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, str(c.work / "ckpt_driver.py"), str(c.work / "ckpt.json")],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    marker = Path(cfg.out_dir + ".partial") / "checkpoints" / "step_00000002" / "COMPLETE"
    deadline = time.time() + 600
    while not marker.is_file():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("the run to kill ended (or stalled) before its step-2 checkpoint")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run(cfg)  # resumes from step 2
    m, _ = _metrics(cfg.out_dir)
    c.figure("checkpoint", "save seconds", m.get("checkpoint_save_s", float("nan")))
    c.figure("checkpoint", "resume load seconds", m.get("resume_load_s", float("nan")))

    def weights(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = weights(ref.out_dir), weights(cfg.out_dir)
    same = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    c.figure("checkpoint", "SIGKILL + resume equals uninterrupted (bitwise)", "yes" if same else "NO")


def arm_serve(c: Check) -> None:
    import urllib.request

    from minima.infer.serve import launch

    with launch(str(c.models["sft_base"]), "log_level=warning") as server:
        body = {"prompt": "The sky is", "max_tokens": c.size.gen_tokens * 4, "temperature": 0.0, "stream": True}
        req = urllib.request.Request(
            server.base_url + "/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        t0 = time.time()
        first, chunks = None, 0
        with urllib.request.urlopen(req, timeout=300) as r:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                if json.loads(line[5:])["choices"][0].get("text"):
                    chunks += 1
                    first = first or time.time()
        end = time.time()
    if first is None:
        raise RuntimeError("the server streamed no text")
    c.figure("serve", "time to first token ms", 1000 * (first - t0))
    c.figure("serve", "streamed chunks/s after the first", (chunks - 1) / max(end - first, 1e-9))


ARM_FUNCS = {
    "train": arm_train,
    "distill": arm_distill,
    "sft": arm_sft,
    "evaluate": arm_evaluate,
    "checkpoint": arm_checkpoint,
    "serve": arm_serve,
}


def write_results(c: Check, wall: float) -> None:
    from benchmarks.results import machine, write_section

    table = "\n".join(f"| {arm} | {name} | {value} |" for arm, name, value in c.rows)
    write_section(
        "gpu",
        f"""## GPU checks (`bash benchmarks/gpu_check.sh`)

Machine: {machine()}; {wall:.0f} s in all. Shapes: a 7B-shaped Llama cut to
{GPU.teacher["num_hidden_layers"]} layers (hidden {GPU.teacher["hidden_size"]}, vocab {GPU.vocab}), a
{GPU.student["num_hidden_layers"]}-layer hidden-{GPU.student["hidden_size"]} student; seq {GPU.seq}; random
weights loaded with `from_pretrained`, the demo corpus as data. See the script's docstring for each arm.

| arm | figure | value |
|---|---|---|
{table}
""",
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="every arm at toy size on CPU (no RESULTS.md)")
    p.add_argument("--only", nargs="*", choices=ARMS, help="run these arms only")
    p.add_argument("--budget-s", type=float, default=None, help="time budget (default 470 on GPU, 600 smoke)")
    p.add_argument("--work", help="work directory (default: a temporary one)")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    a = p.parse_args(argv)
    import torch

    if not a.cpu_smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --cpu-smoke", file=sys.stderr)
        return 2
    if a.cpu_smoke:
        # One rank in this process, one thread: toy models run fastest so on a shared box.
        os.environ.update(MINIMA_INPROCESS="1", MINIMA_NUM_THREADS="1", DS_ACCELERATOR="cpu")
        torch.set_num_threads(1)
    os.environ.setdefault("MINIMA_NO_PROGRESS", "1")
    t0 = time.time()
    tmp = tempfile.TemporaryDirectory(prefix="gpu_check-") if not a.work else None
    work = Path(a.work or tmp.name)
    c = Check(work, a.cpu_smoke, a.budget_s or (600 if a.cpu_smoke else 470))
    failed = []
    setup(c)
    c.figure("setup", "seconds", time.time() - t0)
    for arm in a.only or ARMS:
        if c.left_s <= 0:
            c.figure(arm, "skipped", "out of time budget")
            continue
        t = time.time()
        try:
            ARM_FUNCS[arm](c)
        except Exception as e:  # report and go on: one broken arm must not hide the others' figures
            traceback.print_exc()
            c.figure(arm, "FAILED", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            failed.append(arm)
        c.figure(arm, "arm seconds", time.time() - t)
    wall = time.time() - t0
    print(f"gpu_check: done in {wall:.0f} s; failed arms: {', '.join(failed) or 'none'}", flush=True)
    if not a.cpu_smoke and not a.no_write:
        write_results(c, wall)
    if tmp is not None:
        tmp.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
