"""The Recipe API: what a training stage (adapt, distill, sft) supplies to the shared engine.

A stage writes one small Recipe subclass; the engine owns launching, the loop, loss normalisation,
checkpoints/resume, metrics and export. Everything here runs inside each rank (worker process).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

IGNORE_INDEX = -100


@dataclass
class TrainContext:
    """Built by the engine inside each rank and handed to every recipe hook."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dtype: torch.dtype
    work_dir: Path  # the stage's <out_dir>.partial; checkpoints live in work_dir/checkpoints
    out_dir: Path  # where the final artifact will be published (read-only for recipes)
    seed: int

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0


@dataclass
class LossOut:
    """One micro-batch's loss as SUMS; the engine divides by the step's total label tokens."""

    loss_sum: torch.Tensor  # sum of per-token losses in this micro-batch (not a mean)
    num_tokens: int | torch.Tensor  # tokens that carry a label (a device tensor: no host sync per micro step)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # extra sums, logged / num_tokens


def shifted_label_count(labels: torch.Tensor) -> int:
    """Label-carrying positions of a causal LM batch (position t predicts labels[t + 1])."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


#: Vocab columns per chunk of the LM loss: fp32 temporaries stay [tokens, LM_LOSS_CHUNK] whatever the vocab.
LM_LOSS_CHUNK = 8192


def causal_lm_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, chunk: int = LM_LOSS_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross entropy over labels != -100, and the number of such tokens (a tensor).

    The logits are read in vocab chunks (:func:`minima.train.objectives.kd.dense_loss`): no fp32 copy of
    the [batch x seq x vocab] logits, no log-softmax of that size, and one gradient buffer in the logits'
    dtype; loss and gradient equal fp32 ``cross_entropy``'s. The labels are shifted instead of the logits,
    so the logits are not copied either. The count stays on the device: reading it would stall the host
    on every micro step.
    """
    from minima.train.objectives.kd import dense_loss

    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[..., :-1] = labels[..., 1:]
    flat = shifted.reshape(-1)
    ce, _ = dense_loss(logits.reshape(-1, logits.shape[-1]), flat, None, chunk=chunk)
    return ce.sum(), (flat != IGNORE_INDEX).sum()


class Recipe:
    """Base recipe: causal-LM training of ``cfg.model`` on ``cfg.records`` (format=lm or chat).

    Subclasses override what differs (distill: a teacher and a KD loss; sft: chat records, LoRA).
    Hooks are called on every rank unless stated otherwise.
    """

    #: evaluate on the dev split before the first step too (its metrics are reported as ``<name>_initial``)
    eval_at_start: bool = False

    def __init__(self, cfg):
        self.cfg = cfg
        self.tokenizer = None
        self.pad_id = 0

    # ------------------------------------------------------------------ setup and model
    def setup(self, ctx: TrainContext) -> None:
        """Load what the recipe needs besides the model (tokenizer, teacher ...). Default: the tokenizer."""
        src = self.tokenizer_source()
        if src is not None:
            from minima.models.loader import load_tokenizer

            self.tokenizer = load_tokenizer(src)
            pad = self.tokenizer.pad_token_id
            self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def tokenizer_source(self) -> Optional[Path]:
        """Directory holding the tokenizer to export: the records' tokenizer/ copy, else the model dir."""
        recs = getattr(self.cfg, "records", None)
        if recs and (Path(recs) / "tokenizer").is_dir():
            return Path(recs) / "tokenizer"
        model = getattr(self.cfg, "model", None)
        if model and any(
            (Path(model) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
        ):
            return Path(model)
        return None

    def build_model(self, ctx: TrainContext) -> torch.nn.Module:
        """The trainable HF model, loaded in fp32 before the strategy wraps it (the strategy casts for compute)."""
        from minima.train.model_init import load_pretrained

        model = load_pretrained(self.cfg.model, self.cfg, ctx, dtype=torch.float32)
        if getattr(self.cfg, "activation_checkpointing", False):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        return model

    def trainable_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ data
    def build_datasets(self, ctx: TrainContext):
        """(train, dev) iterable datasets sharded by ctx.rank/world_size, with state_dict()/load_state_dict()."""
        from minima.data.records import RecordDataset

        recs = self.cfg.records
        # loop=True: the reader's own (epoch, offset) state crosses epoch ends exactly.
        train = RecordDataset(recs, split="train", rank=ctx.rank, world_size=ctx.world_size, seed=ctx.seed, loop=True)
        self.pad_id = train.pad_id
        dev = None
        if (Path(recs) / "dev").is_dir() and any((Path(recs) / "dev").glob("*.tfrecord")):
            dev = RecordDataset(
                recs, split="dev", rank=ctx.rank, world_size=ctx.world_size, seed=ctx.seed, shuffle_buffer=0
            )
            if dev.num_records == 0:
                dev = None
        return train, dev

    def num_train_examples(self) -> Optional[int]:
        """Train records in all shards (used to size epochs when max_steps = -1); None if unknown."""
        recs = getattr(self.cfg, "records", None)
        if not recs or not (Path(recs) / "manifest.json").is_file():
            return None
        m = json.loads((Path(recs) / "manifest.json").read_text()).get("metrics", {})
        for key in ("num_train_records", "train_records"):
            if isinstance(m.get(key), int):
                return m[key]
        n = m.get("num_records")
        if isinstance(n, dict):
            return n.get("train")
        return n if isinstance(n, int) else None

    def collate(self, batch: list[dict]) -> dict:
        from minima.data.records import collate

        return collate(batch, self.pad_id)

    def begin_step(self, step: int) -> None:
        """Called before the micro-batches of optimizer step ``step`` (0-based, the same on every rank) are drawn."""

    def count_tokens(self, batch: dict) -> int:
        """Label tokens of a micro-batch, counted BEFORE the forward so the step's normaliser is known.

        Must equal the ``num_tokens`` that ``compute_loss`` returns for the same batch (the engine
        checks); override both together.
        """
        return shifted_label_count(batch["labels"])

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, batch: dict, ctx: TrainContext, train: bool) -> LossOut:
        """Default: causal LM cross entropy summed over labels != -100."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
        loss_sum, n = causal_lm_loss_sum(out.logits, batch["labels"])
        return LossOut(loss_sum=loss_sum, num_tokens=n)

    def extra_flops_per_token(self, seq_len: int) -> float:
        """FLOPs per trained token spent outside the trained model's forward and backward (a teacher's
        forward in distillation), counted in MFU. Default: none."""
        return 0.0

    # ------------------------------------------------------------------ hooks
    def dev_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """Dev metrics beyond the loss from ``compute_loss``'s metrics, each summed over the dev split and
        divided by its count like the loss. Default: those means under their own names."""
        return dict(means)

    def build_callbacks(self, ctx: TrainContext) -> list[Any]:
        """Objects with ``on_eval(step, model, ctx) -> dict | None`` run after each dev evaluation."""
        return []

    def export(self, model, out_dir: Path, ctx: TrainContext) -> None:
        """Write the final HF dir (rank 0 only; the strategy hands over the whole model, gathered from its shards).

        Default: safetensors shards + config + generation_config + the tokenizer.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir), safe_serialization=True, max_shard_size="2GB")
        gen = getattr(model, "generation_config", None)
        if gen is not None and not (out_dir / "generation_config.json").is_file():
            gen.save_pretrained(str(out_dir))
        src = self.tokenizer_source()
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out_dir))
        if src is not None and (src / "tokenizer.model").is_file() and not (out_dir / "tokenizer.model").is_file():
            import shutil

            shutil.copyfile(src / "tokenizer.model", out_dir / "tokenizer.model")
