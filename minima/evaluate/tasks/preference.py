"""preference: does a model prefer the chosen response of held-out preference pairs?

Pair files (``tasks.preference.path``: a .jsonl/.json file, a folder or a glob, else
``data_dir/preference``) hold the shapes ``minima records format=preference`` reads (see
:mod:`minima.data.preference`: prompt/chosen/rejected strings, message lists, raw hh-rlhf). Each pair
asks two loglikelihood requests with the same context: the chosen and the rejected response. Metrics:

- ``acc``: pairwise accuracy, log p(chosen | prompt) > log p(rejected | prompt) (a tie counts 1/2);
- ``acc_norm``: the same with each log-probability divided by its response's length in characters;
- ``margin``: mean of log p(chosen) - log p(rejected), in nats.

Any two models are comparable on the same file: the contexts and continuations are text, scored the
lm-eval way. Without a chat template the context is the prompt text (hh-rlhf's transcript up to
``Assistant:``, or the prompt string, with a space before the responses as lm-eval's target
delimiter); message lists are written as ``User: ...`` / ``Assistant: ...`` lines. With
``chat_template=true`` a single-turn prompt is wrapped in the model's template.
"""

from __future__ import annotations

from pathlib import Path

from minima.core.errors import DataError, InputError
from minima.evaluate.data import list_files, read_rows
from minima.evaluate.tasks.base import Instance, Request, Task
from minima.evaluate.tasks.loading import Doc, TaskData, task_root
from minima.evaluate.tasks.registry import register_task

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def _plain(msgs: list[dict]) -> str:
    return "\n".join(f"{ROLE_NAMES[m['role']]}: {m['content']}" for m in msgs)


def pair_doc(pair, where: str) -> Doc:
    """A :class:`~minima.data.preference.Pair` as a doc: query = prompt text, choices = [chosen, rejected]."""
    if pair.text is not None:
        prompt, chosen, rejected = pair.text
        if prompt and not prompt[-1].isspace() and not (chosen[:1].isspace() or rejected[:1].isspace()):
            chosen, rejected = " " + chosen, " " + rejected  # lm-eval's target delimiter
    else:
        prompt = _plain(pair.prompt) + "\nAssistant:"
        chosen = " " + _plain(pair.chosen).removeprefix("Assistant: ")
        rejected = " " + _plain(pair.rejected).removeprefix("Assistant: ")
    return Doc(query=prompt, choices=[chosen, rejected], gold=0, raw={"prompt": pair.prompt}, where=where)


def load_pairs(root: Path, limit=None) -> tuple[list[Doc], list[str]]:
    """Pair docs of every file under ``root`` (each file's shape fixed by its first row)."""
    from minima.data.preference import detect_shape, normalise_pair

    files = list_files(root, suffixes=(".jsonl", ".json"))
    if not files:
        raise InputError(
            f"preference: no .jsonl/.json pair files under {root}",
            where="tasks.preference.path",
            fix="point it at a held-out pair file (prompt/chosen/rejected, message lists or hh-rlhf)",
        )
    docs: list[Doc] = []
    for f in files:
        shape = None
        for line, row in read_rows(f):
            where = f"{f}:{line}"
            try:
                shape = shape or detect_shape(row)
                docs.append(pair_doc(normalise_pair(row, shape), where))
            except ValueError as e:
                raise DataError(f"bad preference pair: {e}", where=where, fix="fix or remove the record") from None
            if limit and len(docs) >= limit:
                return docs, [str(x) for x in files]
    return docs, [str(x) for x in files]


class Preference(Task):
    """Two loglikelihood requests per pair; accuracy, length-normalised accuracy and mean margin."""

    name = "preference"
    kind = "multiple_choice"
    folders = ("preference",)
    in_shared_data = False

    @property
    def formats(self):
        return {"pairs": "JSONL/JSON preference pairs: prompt/chosen/rejected, message lists, or raw hh-rlhf"}

    def load(self, data_dir, settings):
        root = task_root(self, data_dir, settings.spec.get("path"))
        docs, files = load_pairs(root, settings.limit)
        return TaskData(eval={"": docs}, fewshot={}, eval_split=None, fewshot_split=None, files=files, format="pairs")

    def instances(self, data: TaskData, settings) -> list[Instance]:
        out = []
        for doc in data.eval[""]:
            ctx = doc.query
            if settings.chat_template:
                prompt = doc.raw["prompt"]
                if len(prompt) != 1 or prompt[0]["role"] != "user":
                    raise InputError(
                        "preference: chat_template=true scores single-turn prompts (one user message)",
                        where=doc.where,
                        fix="evaluate this file with chat_template=false",
                    )
                ctx = settings.render(prompt[0]["content"])
                choices = [c.lstrip() for c in doc.choices]
            else:
                choices = doc.choices
            out.append(Instance("", doc, [Request("loglikelihood", (ctx, c)) for c in choices]))
        return out

    def process_results(self, doc, outputs, settings):
        (c, _), (r, _) = outputs
        nc, nr = max(len(doc.choices[0]), 1), max(len(doc.choices[1]), 1)
        acc = 1.0 if c > r else 0.5 if c == r else 0.0
        acc_norm = 1.0 if c / nc > r / nr else 0.5 if c / nc == r / nr else 0.0
        return {"acc": acc, "acc_norm": acc_norm, "margin": c - r}, {"logp_chosen": c, "logp_rejected": r}

    def metric_names(self, settings):
        return ("acc", "acc_norm", "margin")

    def info(self, scored, settings):
        return {**super().info(scored, settings), "chat_template": settings.chat_template}


register_task(Preference())
