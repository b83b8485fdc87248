"""Perplexity: token perplexity and bits per byte of text files (.txt, or JSON/JSONL rows with a 'text' field).

Texts: ``tasks.perplexity.path`` (files, a folder or a glob), else ``data_dir/perplexity``, else the demo corpus;
each scored by rolling windows of the model's context length (``max_length``), advancing ``stride`` tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from minima.core.errors import InputError
from minima.evaluate import metrics as M
from minima.evaluate.data import list_files, read_rows
from minima.evaluate.tasks.base import Instance, Request, Scored, Task
from minima.evaluate.tasks.loading import Doc, TaskData
from minima.evaluate.tasks.registry import register_task


def perplexity_texts(spec: dict, data_root: Optional[Path], limit: Optional[int]) -> list[tuple[str, str]]:
    """(name, text) pairs: the task path (files, a folder or a glob), data_dir/perplexity, else the demo corpus."""
    root = Path(spec["path"]).expanduser() if spec.get("path") else None
    if root is None and data_root is not None:
        root = next((data_root / f for f in ("perplexity",) if (data_root / f).exists()), None)
    if root is None:
        from minima.data.demo import generate

        c = generate()
        n = limit or 200
        return [
            ("demo/pretrain_en", "\n".join(c.pretrain_en[:n]) + "\n"),
            ("demo/pretrain_zh", "\n".join(c.pretrain_zh[:n]) + "\n"),
        ]
    if spec.get("path") and not root.exists() and not any(ch in str(root) for ch in "*?["):
        raise InputError(f"perplexity: path {root} does not exist", where="tasks.perplexity.path")
    files = list_files(root, suffixes=(".txt", ".jsonl", ".json"))
    if not files:
        raise InputError(
            f"perplexity: no .txt/.jsonl files under {root}",
            where="tasks.perplexity.path",
            fix="point it at text files (or JSONL rows with a 'text' field)",
        )
    out = []
    for f in files:
        if f.suffix == ".txt":
            with open(f, encoding="utf-8") as fh:
                lines = [line for _, line in zip(range(limit) if limit else iter(int, 1), fh)]
            text = "".join(lines)
        else:
            rows = []
            for line, row in read_rows(f):
                if "text" not in row:
                    raise InputError("row has no 'text' field", where=f"{f}:{line}")
                rows.append(str(row["text"]))
                if limit and len(rows) >= limit:
                    break
            text = "\n\n".join(rows)
        out.append((str(f), text))
    return out


class Perplexity(Task):
    """One rolling-loglikelihood request per text; scores pool the texts' tokens and bytes."""

    name = "perplexity"
    kind = "loglikelihood_rolling"
    folders = ("perplexity",)

    @property
    def formats(self):
        return {"text": "plain text files (.txt), or JSONL/JSON rows with a 'text' field"}

    def load(self, data_dir, settings):
        texts = perplexity_texts(settings.spec, data_dir, settings.limit)
        docs = [Doc(query=text, where=name) for name, text in texts]
        return TaskData(
            eval={"": docs}, fewshot={}, eval_split=None, fewshot_split=None, files=[n for n, _ in texts], format="text"
        )

    def data_info(self, data):
        return {}

    def window(self, settings) -> tuple[int, int]:
        """(window, stride) in tokens: ``max_length`` (default the model's) and ``stride`` (default half of it)."""
        window = settings.spec.get("max_length") or settings.max_length
        return window, settings.spec.get("stride") or max(1, window // 2)

    def instances(self, data, settings):
        window, stride = self.window(settings)
        return [Instance("", d, [Request("loglikelihood_rolling", (d.query, window, stride))]) for d in data.eval[""]]

    def score(self, instances, outputs, settings):
        scored = []
        for inst, (res,) in zip(instances, outputs):
            if res is None:  # under two tokens: nothing to predict
                continue
            nll, n = res
            b = len(inst.doc.query.encode("utf-8"))
            metrics = {
                "token_perplexity": M.token_perplexity(nll, n),
                "bits_per_byte": M.bits_per_byte(nll, b),
                "tokens": n,
            }
            scored.append(Scored("", inst.doc, metrics, {"file": inst.doc.where, "nll": nll}))
        return scored

    def aggregate(self, scored, settings):
        total_nll, total_tok, total_bytes = 0.0, 0, 0
        for s in scored:
            total_nll += s.record["nll"]
            total_tok += s.metrics["tokens"]
            total_bytes += len(s.doc.query.encode("utf-8"))
        if not total_tok:
            raise InputError("perplexity: the texts are empty", where="tasks.perplexity.path")
        return {
            "token_perplexity": M.token_perplexity(total_nll, total_tok),
            "bits_per_byte": M.bits_per_byte(total_nll, total_bytes),
            "files": {s.record["file"]: dict(s.metrics) for s in scored},
        }

    def info(self, scored, settings):
        window, stride = self.window(settings)
        tokens = sum(s.metrics["tokens"] for s in scored)
        return {"n": len(scored), "tokens": tokens, "window": window, "stride": stride, "mode": "rolling"}

    def sample(self, s):
        return {"task": self.name, **s.record, **s.metrics}


register_task(Perplexity())
