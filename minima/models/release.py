"""A model's release: a clean safetensors dir, its lineage back to the raw data, and a Hugging Face model card.

- :func:`write_safetensors_release` copies what a user needs to run the model (weight shards with an
  index, config, tokenizer, generation config) and nothing of its training (checkpoints, optimizer
  state, metrics, launch files).
- :func:`lineage` walks the artifacts' manifests back through their ``inputs`` to the raw files, so a
  released model says which data, configs and code made it; :func:`lineage_rows` sums it up per stage.
- :func:`model_card` writes the README.md: YAML header (license, languages, base_model, pipeline_tag,
  tags), how to run it, the lineage and the evaluation table.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from minima.core.artifacts import MANIFEST, read_manifest
from minima.core.errors import InputError
from minima.core.logs import get_logger

log = get_logger("minima.models.release")

#: What a release dir carries besides the weights (each copied when the model dir has it).
RELEASE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
SAFE_INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------- release dir
def write_safetensors_release(
    model_dir: str | Path, out_dir: str | Path, dtype: str = "bf16", max_shard_size: str = "2GB"
) -> dict:
    """Save ``model_dir`` in ``dtype`` as safetensors shards with an index, plus its config and tokenizer.

    The tokenizer and generation files are copied byte for byte; the weights go through
    transformers' ``save_pretrained`` so any HF loader (vLLM, TGI, transformers) reads them.
    """
    import torch
    from transformers import AutoModelForCausalLM

    src, out = Path(model_dir), Path(out_dir)
    torch_dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch_dtype, trust_remote_code=False)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    del model
    for name in RELEASE_FILES:
        if name != "config.json" and (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    _ensure_index(out)
    index = json.loads((out / SAFE_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    return {
        "shards": shards,
        "weights_bytes": sum((out / s).stat().st_size for s in shards),
        "tensors": len(index["weight_map"]),
    }


def _ensure_index(out: Path) -> None:
    """Give a single-file save the same shard + index layout as a sharded one."""
    from safetensors import safe_open

    single = out / "model.safetensors"
    if (out / SAFE_INDEX).is_file() or not single.is_file():
        return
    shard = "model-00001-of-00001.safetensors"
    single.rename(out / shard)
    total = 0
    with safe_open(str(out / shard), framework="pt") as f:
        names = list(f.keys())
        for k in names:
            s = f.get_slice(k)
            n = 1
            for d in s.get_shape():
                n *= d
            total += n * {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4}.get(s.get_dtype(), 1)
    index = {"metadata": {"total_size": total}, "weight_map": dict.fromkeys(names, shard)}
    (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")


# -------------------------------------------------------------------------------- lineage
def _resolve(path: Optional[str]) -> Optional[Path]:
    return Path(path).resolve() if path else None


def lineage(model_dir: str | Path) -> dict:
    """The artifacts that made ``model_dir``, upstream first, and the raw files they read.

    Each artifact entry has its stage, config, cache key, creation time, code version, inputs and
    metrics. An input whose artifact was rebuilt since (its cache key is no longer the one recorded)
    is marked ``"current": false``. A model dir that is not an artifact gives an empty lineage.
    """
    artifacts: list[dict] = []
    raw: dict[str, dict] = {}
    seen: set[Path] = set()

    def visit(p: Path) -> None:
        if p in seen:
            return
        seen.add(p)
        m = read_manifest(p)
        inputs = {}
        for name, inp in (m.get("inputs") or {}).items():
            q = _resolve(inp.get("path"))
            if q is None:
                continue
            entry: dict[str, Any] = {"path": str(q), "hash": inp.get("hash")}
            if (q / MANIFEST).is_file():
                entry["kind"] = "artifact"
                entry["current"] = read_manifest(q).get("cache_key") == inp.get("hash")
                visit(q)
            else:
                entry["kind"] = "raw" if q.exists() else "missing"
                r = raw.setdefault(str(q), {"path": str(q), "hash": inp.get("hash"), "used_by": []})
                r["used_by"].append(f"{p.name}:{name}")
            inputs[name] = entry
        artifacts.append(
            {
                "name": p.name,
                "stage": m.get("stage"),
                "path": str(p),
                "cache_key": m.get("cache_key"),
                "created": m.get("created"),
                "minima_version": m.get("minima_version"),
                "git_commit": m.get("git_commit"),
                "wall_time_s": m.get("wall_time_s"),
                "config": m.get("config"),
                "inputs": inputs,
                "metrics": m.get("metrics", {}),
            }
        )

    root = Path(model_dir).resolve()
    if (root / MANIFEST).is_file():
        visit(root)
    return {"model": str(root), "artifacts": artifacts, "raw_data": list(raw.values())}


def find_evaluation(model_dir: str | Path) -> Optional[Path]:
    """The newest evaluate artifact beside ``model_dir`` (same parent dir) that evaluated it, if any."""
    root = Path(model_dir).resolve()
    found = []
    for m_file in root.parent.glob(f"*/{MANIFEST}"):
        try:
            m = json.loads(m_file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if m.get("stage") != "evaluate":
            continue
        if any(_resolve(i.get("path")) == root for i in (m.get("inputs") or {}).values()):
            found.append((m.get("created") or "", m_file.parent))
    return max(found)[1] if found else None


def _int(v: Any) -> str:
    return f"{v:,}" if isinstance(v, int) else str(v)


def _shape(s: dict) -> str:
    return (
        f"{s.get('num_layers')} layers, {s.get('num_heads')} heads ({s.get('num_key_value_heads')} KV), "
        f"hidden {s.get('hidden_size')}, FFN {s.get('intermediate_size')}"
    )


def _sources(a: dict) -> str:
    m = a["metrics"].get("sources") or {}
    if m:
        return ", ".join(
            f"{n} ({Path(s.get('path', '')).name}, {100 * s['share_tokens']:.0f}% of tokens)"
            if "share_tokens" in s
            else f"{n} ({Path(s.get('path', '')).name})"
            for n, s in m.items()
        )
    return ", ".join(
        f"{k.split(':', 1)[1]} ({Path(v['path']).name})" for k, v in a["inputs"].items() if k.startswith("source:")
    )


def lineage_rows(lin: dict) -> list[list[str]]:
    """One row per artifact of the lineage: [artifact, stage, tokens, what it did]."""
    by_path = {a["path"]: a for a in lin["artifacts"]}
    rows = []
    for a in lin["artifacts"]:
        m, cfg, stage = a["metrics"], a.get("config") or {}, a["stage"]
        tokens = m.get("train_tokens", m.get("total_tokens", ""))
        facts: list[str] = []
        if stage == "vocab":
            sizes = f"{_int(m.get('base_vocab_size'))} -> {_int(m.get('vocab_size'))}"
            facts.append(
                f"+{_int(m.get('pieces_added'))} pieces ({sizes}, {_int(m.get('pad_pieces', 0))} padding), "
                f"mode {m.get('mode')}"
            )
            if m.get("zh_tokens_per_char_before") is not None:
                facts.append(
                    f"zh tokens/char {m['zh_tokens_per_char_before']} -> {m.get('zh_tokens_per_char_after')}, "
                    f"English changed {100 * m.get('english_changed_fraction', 0):.1f}%"
                )
        elif stage == "records":
            facts.append(f"format {m.get('format')}: {_sources(a)}")
        elif stage == "prune":
            if m.get("teacher_shape") and m.get("target_shape"):
                facts.append(f"{_shape(m['teacher_shape'])} -> {_shape(m['target_shape'])}")
            if m.get("params_before"):
                facts.append(
                    f"params {_int(m['params_before'])} -> {_int(m.get('params_after'))} "
                    f"({100 * m.get('params_after', 0) / m['params_before']:.1f}%), importance {m.get('importance')}"
                )
        elif stage == "evaluate":
            n = len({k.split("/")[0] for k in m if "/" in k})
            facts.append(f"{n} model(s) scored (table below)")
        if "train_tokens" in m:
            facts.append(f"{_int(m.get('steps'))} steps")
            if m.get("dev_loss") is not None:
                facts.append(f"dev loss {m['dev_loss']:.4f}")
        if stage == "distill" and isinstance(cfg.get("loss"), dict):
            lo = cfg["loss"]
            alpha = float(lo.get("alpha", 0))
            facts.append(f"loss {alpha:g} x CE + {1 - alpha:g} x {lo.get('kd')} at T={lo.get('temperature')}")
        if stage == "sft":
            data = [by_path[i["path"]] for i in a["inputs"].values() if i.get("path") in by_path]
            srcs = [_sources(d) for d in data if d["stage"] == "records"]
            srcs += [Path(f).name for f in cfg.get("train_files") or []]
            if srcs:
                facts.append("data: " + "; ".join(s for s in srcs if s))
        rows.append([a["name"], stage or "", _int(tokens), "; ".join(facts)])
    return rows


def base_model_name(lin: dict) -> Optional[str]:
    """The name of the first model dir the lineage read as a raw input (the run's starting model)."""
    for r in lin["raw_data"]:
        p = Path(r["path"])
        if (p / "config.json").is_file():
            return p.name
    return None


# ----------------------------------------------------------------------------- model card
def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def model_card(
    *,
    name: str,
    fmt: str,
    dtype: str,
    files: list[tuple[str, int]],
    lin: dict,
    license: str,
    language: list[str],
    base_model: Optional[str],
    tags: list[str],
    scores: Optional[tuple[list[str], list[list[Any]]]] = None,
    evaluation: Optional[str] = None,
    family: Optional[str] = None,
) -> str:
    """README.md in the Hugging Face model card format.

    Args:
        name: the model's name (title, Ollama name).
        fmt: gguf or safetensors; dtype: the weights' type.
        files: (file name, bytes) of the release's model files.
        lin: :func:`lineage` of the exported model.
        scores: (headers, rows) of the evaluation table, already formatted.
        evaluation: the evaluate artifact the scores come from.
    """
    import yaml

    header: dict[str, Any] = {"license": license, "language": list(language)}
    if base_model:
        header["base_model"] = base_model
    header["pipeline_tag"] = "text-generation"
    if fmt == "safetensors":
        header["library_name"] = "transformers"
    header["tags"] = list(dict.fromkeys(["minima", *([family] if family else []), fmt, *tags]))
    out = ["---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# {name}", ""]
    stages = " -> ".join(dict.fromkeys(a["stage"] for a in lin["artifacts"] if a["stage"] != "evaluate"))
    out += [
        f"A compact bilingual ({', '.join(language)}) causal language model made with minima"
        + (f" ({stages})" if stages else "")
        + f", released as {fmt} ({dtype}).",
        "",
        "## Files",
        "",
        markdown_table(["file", "size"], [[f, f"{b / 2**20:.2f} MiB"] for f, b in files]),
        "",
        "## Use",
        "",
    ]
    if fmt == "gguf":
        gguf_file = files[0][0]
        out += [
            "llama.cpp:",
            "",
            "```bash",
            f"llama-cli -m {gguf_file} -cnv",
            "```",
            "",
            "Ollama (the chat template travels inside the GGUF):",
            "",
            "```bash",
            f"printf 'FROM ./{gguf_file}\\n' > Modelfile",
            f"ollama create {name.lower()} -f Modelfile && ollama run {name.lower()}",
            "```",
        ]
    else:
        out += [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'tok = AutoTokenizer.from_pretrained("path/to/this/dir")',
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/dir", dtype="auto")',
            'ids = tok.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True,',
            '                              return_tensors="pt", return_dict=True)',
            "print(tok.decode(model.generate(**ids, max_new_tokens=64)[0]))",
            "```",
            "",
            "vLLM: `vllm serve path/to/this/dir`.",
        ]
    out += ["", "## Lineage", ""]
    if lin["artifacts"]:
        out += [
            "Each stage's artifact, upstream first (tokens: tokens seen in training, or tokens built for records). "
            "`lineage.json` holds every config, input hash and metric.",
            "",
            markdown_table(["artifact", "stage", "tokens", "what it did"], lineage_rows(lin)),
            "",
            "Raw inputs:",
            "",
        ]
        out += [
            f"- `{Path(r['path']).name}` (sha256 {str(r['hash'])[:12]}, read by {', '.join(r['used_by'])})"
            for r in lin["raw_data"]
        ]
        commits = sorted({a["git_commit"] for a in lin["artifacts"] if a.get("git_commit")})
        versions = sorted({a["minima_version"] for a in lin["artifacts"] if a.get("minima_version")})
        if commits or versions:
            out += [
                "",
                f"Built with minima {', '.join(versions)}" + (f" (commit {', '.join(commits)})." if commits else "."),
            ]
    else:
        out.append("The exported model dir is not a minima artifact, so its lineage is unknown.")
    out += ["", "## Evaluation", ""]
    if scores and scores[1]:
        src = f" (`{Path(evaluation).name}`)" if evaluation else ""
        out += [
            f"Scores from the run's evaluate artifact{src}; percentages for accuracies.",
            "",
            markdown_table(*scores),
        ]
    else:
        out.append("No evaluate artifact was found for this model.")
    return "\n".join(out) + "\n"


def check_release_inputs(model_dir: str | Path) -> None:
    """A release needs an HF model dir with safetensors weights and a tokenizer."""
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise InputError(
            f"{d} is not a Hugging Face model dir (no config.json)", fix="pass model=<a stage's model dir>"
        )
    if not any(d.glob("*.safetensors")):
        raise InputError(f"no safetensors weights in {d}", fix="save the model with safe_serialization=True")
    if not ((d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file()):
        raise InputError(f"{d} has no tokenizer", fix="save the tokenizer into the model dir")
