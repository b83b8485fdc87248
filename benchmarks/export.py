"""Export stage benchmark: file sizes, time taken and the round trip's max |Δ| per stored type.
Writes its section of benchmarks/RESULTS.md.

    python benchmarks/export.py                      # the demo's chat model (micro preset) + a 34M LLaMA
    python benchmarks/export.py --preset tiny        # the demo at its full tiny preset
    python benchmarks/export.py --shape 1b           # the timing part on a 1.1B LLaMA shape

Part 1 runs the demo pipeline on the built-in data (or reuses ``--run-dir`` when it is complete),
then exports its chat model as GGUF f16 / bf16 / q8_0 and as a bf16 safetensors release, reads each
GGUF back with gguf's reader and compares every tensor with the HF weight (in llama.cpp's Q/K row
order). Part 2 times the GGUF writer on a bigger random LLaMA (the weights' values do not change
the time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("MINIMA_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.prune import SHAPES as PRUNE_SHAPES  # noqa: E402
from benchmarks.results import machine, write_section  # noqa: E402

SHAPES = {
    "small": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1376,
        vocab_size=8000,
    ),
    "1b": PRUNE_SHAPES["1b"],  # TinyLlama-1.1B
}
GGUF_TYPES = ("f16", "bf16", "q8_0")


def demo_chat_model(run_dir: Path, preset: str) -> Path:
    """The demo pipeline's sft artifact (built on the built-in data unless already there)."""
    from minima.core.artifacts import is_complete

    sft = run_dir / "06_sft"
    if not is_complete(sft):
        from flows.cli import demo_config, prepare_demo
        from flows.pipeline import pipeline

        prepare_demo(run_dir)
        pipeline(config=demo_config(run_dir), preset=preset)
    return sft


def export(model_dir: Path, out_dir: Path, fmt: str, dtype: str, repeats: int = 3):
    """The export artifact and the best wall time of ``repeats`` forced runs (the first pays the imports)."""
    from minima.core.config import ExportConfig
    from minima.stages.export import run

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        art = run(ExportConfig(model=str(model_dir), out_dir=str(out_dir), format=fmt, dtype=dtype), force=True)
        best = min(best, time.perf_counter() - t0)
    return art, best


def gguf_deltas(model_dir: Path, gguf_file: Path) -> dict[str, dict[str, float]]:
    """Per stored type: max |Δ| between the dequantised GGUF tensor and the HF weight (fp32, GGUF row order);
    for f32/f16/bf16 whether it equals torch's cast of the weight, for q8_0 the largest |Δ| as a fraction
    of the block's error bound."""
    import numpy as np
    import torch
    from safetensors import safe_open

    from minima.models.gguf import model_spec, permute_qk, plan_tensors, read_gguf_tensors

    spec = model_spec(model_dir)
    names = {t.hf_name: t.name for t in plan_tensors(spec, "f16")}
    stored = read_gguf_tensors(gguf_file)
    out: dict[str, dict[str, float]] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for hf_name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if hf_name not in names:
                    continue
                w = st.get_tensor(hf_name).float().numpy()
                if ".q_proj." in hf_name:
                    w = permute_qk(w, spec.num_heads)
                elif ".k_proj." in hf_name:
                    w = permute_qk(w, spec.num_kv_heads)
                kind, got = stored[names[hf_name]]
                d = np.abs(got - w)
                s = out.setdefault(kind, {"max_abs": 0.0, "tensors": 0})
                s["max_abs"] = max(s["max_abs"], float(d.max()))
                s["tensors"] += 1
                cast = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}.get(kind)
                if cast is not None:
                    same = np.array_equal(got, torch.from_numpy(w).to(cast).float().numpy())
                    s["equals_cast"] = s.get("equals_cast", True) and same
                if kind == "q8_0":
                    blocks = w.reshape(-1, 32)
                    bound = np.abs(blocks).max(axis=1, keepdims=True) / 127 * (0.5 + 127 * 2.0**-11)
                    s["of_bound"] = max(s.get("of_bound", 0.0), float((d.reshape(-1, 32) / bound).max()))
    return out


def release_logit_delta(model_dir: Path, release_dir: Path) -> float:
    """Max |Δ| of the release's logits (bf16) against the source model's (fp32) on two sentences."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(release_dir))
    ids = tok(["The capital of France is Paris.", "法国的首都是巴黎。"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()(**ids).logits
        b = AutoModelForCausalLM.from_pretrained(str(release_dir)).eval()(**ids).logits.float()
    return float((a - b).abs().max())


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default="runs/bench-export", help="demo run dir (reused when complete)")
    p.add_argument("--preset", default="micro", help="demo pipeline preset: micro (minutes) or tiny")
    p.add_argument("--shape", default="small", choices=sorted(SHAPES), help="the random LLaMA for the timing part")
    p.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir).resolve()

    # ---- part 1: the demo's chat model
    sft = demo_chat_model(run_dir, a.preset)
    src_bytes = sum(f.stat().st_size for f in sft.glob("*.safetensors"))
    rows1, deltas = [], {}
    for dtype in GGUF_TYPES:
        art, secs = export(sft, run_dir / f"export_gguf_{dtype}", "gguf", dtype)
        gguf_file = art.path / art.metrics["file"]
        deltas[dtype] = gguf_deltas(sft, gguf_file)
        rows1.append([f"gguf {dtype}", art.metrics["file"], mib(art.metrics["bytes"]), f"{secs:.2f}"])
    art, secs = export(sft, run_dir / "export_safetensors_bf16", "safetensors", "bf16")
    rows1.append(["safetensors bf16", ", ".join(art.metrics["shards"]), mib(art.metrics["bytes"]), f"{secs:.2f}"])
    logit_delta = release_logit_delta(sft, art.path)
    card = (art.path / "README.md").read_text()
    lineage = json.loads((art.path / "lineage.json").read_text())

    # ---- part 2: writer time on a bigger random LLaMA
    from minima.testing import demo_tokenizer_dir, tiny_llama

    shape = dict(SHAPES[a.shape])
    big = run_dir / f"random_{a.shape}"
    if not (big / "config.json").is_file():
        tok = demo_tokenizer_dir(run_dir / "bench_tokenizer", run_dir / "data")
        model = tiny_llama(shape.pop("vocab_size"), seed=0, **shape)
        model.save_pretrained(str(big))
        for f in tok.iterdir():
            shutil.copyfile(f, big / f.name)
        del model
    big_bytes = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    rows2 = []
    for dtype in GGUF_TYPES:
        art, secs = export(big, run_dir / f"export_random_{dtype}", "gguf", dtype)
        rows2.append([dtype, mib(art.metrics["bytes"]), f"{secs:.2f}", f"{big_bytes / 2**20 / secs:.0f}"])
        params = art.metrics["params"]

    kinds = ["f32", "f16", "bf16", "q8_0"]
    drows = []
    for dtype in GGUF_TYPES:
        for k in kinds:
            if k in deltas[dtype]:
                s = deltas[dtype][k]
                check = f"{s['of_bound']:.3f} of the bound" if "of_bound" in s else ""
                if "equals_cast" in s:
                    check = "equals torch's cast" if s["equals_cast"] else "DIFFERS from torch's cast"
                drows.append([f"gguf {dtype}", k, s["tensors"], f"{s['max_abs']:.3g}", check])

    def table(headers, rows):
        return "\n".join(
            ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        )

    md = "\n".join(
        [
            "## export (`python benchmarks/export.py`)",
            "",
            f"Machine: {machine()}.",
            "",
            f"The demo's chat model (`{a.preset}` preset, {lineage['artifacts'][-1]['name']}: "
            f"{mib(src_bytes)} MiB of fp32 safetensors), exported by `minima export` (wall time of the stage: "
            "conversion, lineage walk, model card; best of 3 runs):",
            "",
            table(["format", "file", "MiB", "seconds"], rows1),
            "",
            "Round trip: every GGUF tensor read back with gguf's reader and dequantised, against the HF fp32 weight "
            "(in llama.cpp's Q/K row order). f32 (norms), f16 and bf16 must equal the weight cast once by torch; "
            "for q8_0 the check is the largest error as a fraction of its block bound "
            "(max|x|/127 · (1/2 + 127·2⁻¹¹)):",
            "",
            table(["file", "stored type", "tensors", "max abs Δ", "check"], drows),
            "",
            f"Release dir (bf16 safetensors): max |Δ logits| against the fp32 source = {logit_delta:.3g}; "
            f"the model card lists {len(lineage['artifacts'])} artifacts and {len(lineage['raw_data'])} raw inputs "
            f"in its lineage{' and the evaluation table' if '## Evaluation' in card and '| task |' in card else ''}.",
            "",
            f"GGUF writer on a random LLaMA `{a.shape}` ({params / 1e6:.1f}M params, {mib(big_bytes)} MiB fp32):",
            "",
            table(["dtype", "MiB", "seconds", "MiB/s of fp32 read"], rows2),
        ]
    )
    print(md)
    if not a.no_write:
        write_section("export", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
