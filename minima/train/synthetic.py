"""A synthetic-data recipe for engine tests and benchmarks (no records, no tokenizer needed).

Sequences are arithmetic progressions modulo the vocab (learnable, so the loss falls), with
variable lengths and a masked prefix (so padding and label masks matter), generated from
(seed, rank, index): the reader's state is just the next index.
"""

from __future__ import annotations

import random
from typing import ClassVar, Literal, Optional

import torch
from pydantic import Field

from minima.core.config import TrainConfig
from minima.train.recipe import IGNORE_INDEX, Recipe, TrainContext


class SyntheticConfig(TrainConfig):
    """Engine test/benchmark config: a model dir (or config-only dir) + generated sequences."""

    stage: ClassVar[str] = "adapt"
    seq_len: int = Field(32, ge=4, description="Longest sequence.")
    num_examples: int = Field(256, ge=1, description="Train sequences (all ranks together).")
    dev_examples: int = Field(0, ge=0, description="Dev sequences (0 = no dev split).")
    variable_length: bool = Field(True, description="Random lengths in [seq_len/2, seq_len] and a masked prefix.")
    init: Literal["pretrained", "random"] = Field("pretrained", description="random: build from config.json with seed.")
    vocab_size: Optional[int] = Field(None, description="Token ids drawn below this (default: the model's vocab).")


class SyntheticDataset(torch.utils.data.IterableDataset):
    """Deterministic sequences for one rank's shard (indices rank, rank + world, ...)."""

    def __init__(
        self, n: int, seq_len: int, vocab: int, seed: int, rank: int, world: int, variable: bool, offset: int = 0
    ):
        self.n, self.seq_len, self.vocab, self.seed = n, seq_len, vocab, seed
        self.rank, self.world, self.variable, self.offset = rank, world, variable, offset
        self.pos = 0  # next index within this rank's shard
        self.epoch = 0

    def example(self, i: int) -> dict:
        rng = random.Random(self.seed * 1_000_003 + (self.offset + i) * 7919 + self.epoch)
        length = rng.randint(self.seq_len // 2, self.seq_len) if self.variable else self.seq_len
        start, stride = rng.randrange(3, self.vocab), rng.randrange(1, 7)
        ids = torch.tensor([3 + (start + stride * t - 3) % (self.vocab - 3) for t in range(length)], dtype=torch.long)
        labels = ids.clone()
        if self.variable:
            labels[: rng.randint(0, 3)] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}

    def __iter__(self):
        mine = range(self.rank, self.n, self.world)
        while self.pos < len(mine):
            i = mine[self.pos]
            self.pos += 1
            yield self.example(i)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.pos = epoch, 0

    def state_dict(self) -> dict:
        return {"pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.pos, self.epoch = int(state["pos"]), int(state["epoch"])


def pad_collate(batch: list[dict], pad_id: int = 0) -> dict:
    """Right-pad to the longest sequence; padding carries no label and no attention."""
    n = max(len(b["input_ids"]) for b in batch)
    out = {
        "input_ids": torch.full((len(batch), n), pad_id, dtype=torch.long),
        "labels": torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long),
        "attention_mask": torch.zeros((len(batch), n), dtype=torch.long),
    }
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        for key in out:
            out[key][i, :k] = b[key]
    return out


class SyntheticRecipe(Recipe):
    """Causal LM on SyntheticDataset; the model is ``cfg.model`` (weights, or config only with init=random)."""

    def tokenizer_source(self):
        return None

    def build_model(self, ctx: TrainContext) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.cfg.init == "random":
            mc = AutoConfig.from_pretrained(str(self.cfg.model))
            kw = {"attn_implementation": self.cfg.attn_implementation} if self.cfg.attn_implementation else {}
            torch.manual_seed(self.cfg.seed)
            model = AutoModelForCausalLM.from_config(mc, dtype=torch.float32, **kw)
        else:
            from minima.train.model_init import load_pretrained

            model = load_pretrained(self.cfg.model, self.cfg, ctx, dtype=torch.float32)
        if self.cfg.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.vocab = self.cfg.vocab_size or model.config.vocab_size
        return model

    def build_datasets(self, ctx: TrainContext):
        c = self.cfg
        train = SyntheticDataset(
            c.num_examples, c.seq_len, self.vocab, c.seed, ctx.rank, ctx.world_size, c.variable_length
        )
        dev = None
        if c.dev_examples:
            dev = SyntheticDataset(
                c.dev_examples,
                c.seq_len,
                self.vocab,
                c.seed + 1,
                ctx.rank,
                ctx.world_size,
                c.variable_length,
                offset=10**6,
            )
        return train, dev

    def num_train_examples(self) -> int:
        return self.cfg.num_examples

    def collate(self, batch: list[dict]) -> dict:
        return pad_collate(batch, 0)
