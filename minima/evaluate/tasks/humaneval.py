"""HumanEval: complete a Python function from its signature and docstring (``HumanEval.jsonl``), 0 shots.

Prompt: the problem's ``prompt`` as is; generation until a new top-level statement; the prompt, the completion
and the tests run in the sandbox (:mod:`minima.evaluate.sandbox`), scored as unbiased pass@k.
"""

from __future__ import annotations

from minima.evaluate import metrics as M
from minima.evaluate.sandbox import check_programs
from minima.evaluate.tasks.base import GenerateUntilTask, Scored
from minima.evaluate.tasks.loading import Doc, Schema
from minima.evaluate.tasks.registry import register_task

KS = (1, 10, 100)


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval runs: the prompt, the model's completion, the tests, and the check call."""
    return prompt + completion + "\n" + test + "\n" + f"check({entry_point})\n"


def _doc(row: dict, where: str) -> Doc:
    task_id = row["task_id"] if "task_id" in row else int(where.rsplit(":", 1)[1])  # else its line
    return Doc(query=row["prompt"], target=row["test"], gold=row["entry_point"], raw={"task_id": task_id}, where=where)


class HumanEval(GenerateUntilTask):
    name = "humaneval"
    folders = ("humaneval", "human-eval", "openai_humaneval")
    in_shared_data = False
    schemas = (
        Schema(
            "jsonl",
            ("prompt", "test", "entry_point"),
            'JSONL {"task_id", "prompt", "test", "entry_point"} (openai/human-eval, HF openai_humaneval)',
            _doc,
        ),
    )
    until = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]

    def num_samples(self, settings):
        return int(settings.spec.get("num_samples") or 1)

    def metric_names(self, settings):
        n = self.num_samples(settings)
        return tuple(f"pass@{k}" for k in KS if k <= n)

    def score(self, instances, outputs, settings):
        """All completions run in the sandbox in one batch, then pass@k per problem."""
        gens = [out[0] for out in outputs]
        programs = [
            humaneval_program(inst.doc.query, g, inst.doc.target, inst.doc.gold)
            for inst, outs in zip(instances, gens)
            for g in outs
        ]
        results = check_programs(programs, timeout_s=float(settings.spec.get("timeout_s") or 10.0))
        ks = [k for k in KS if k <= self.num_samples(settings)]
        scored, i = [], 0
        for inst, outs in zip(instances, gens):
            rs = results[i : i + len(outs)]
            i += len(outs)
            c = sum(r.passed for r in rs)
            record = {
                "task_id": inst.doc.raw.get("task_id"),
                "completions": outs,
                "status": [r.status for r in rs],
                "detail": [r.detail for r in rs][:1],
                "isolation": rs[0].isolation if rs else None,
            }
            scored.append(
                Scored(inst.subject, inst.doc, {f"pass@{k}": M.pass_at_k(len(outs), c, k) for k in ks}, record)
            )
        return scored

    def info(self, scored, settings):
        return {**super().info(scored, settings), "num_samples": self.num_samples(settings)}


register_task(HumanEval())
