"""Closed pydantic configs, one per stage, plus the pipeline config that nests them.

Rules: ``extra="forbid"``, every field documented, shape arithmetic validated at
construction. Checks that need the file system (paths exist, vocab sizes agree) live in each stage's
``validate_inputs`` and run before any work.

A field marked ``nohash()`` does not change the stage's output (where it goes, how many workers
build it, how it is launched) and is left out of the cache key.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from minima.core.errors import ConfigError

STAGES = ("vocab", "records", "adapt", "prune", "distill", "sft", "dpo", "evaluate", "export")
# dpo refines the sft model and shares its number, so evaluate keeps 07 (runs/x/06_dpo next to 06_sft).
STAGE_NUMBER = {
    "vocab": 1,
    "records": 2,
    "adapt": 3,
    "prune": 4,
    "distill": 5,
    "sft": 6,
    "dpo": 6,
    "evaluate": 7,
    "export": 8,
}


def nohash(default: Any = None, description: str = "", **kw) -> Any:
    """A field that is excluded from the config hash (output location, parallelism, logging)."""
    return Field(default, description=description, json_schema_extra={"hash": False}, **kw)


class Closed(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageConfig(Closed):
    """Fields every stage has."""

    out_dir: Optional[str] = nohash(None, "Output artifact directory. Default: <run_dir>/<NN>_<stage>.")
    run_dir: str = nohash("runs/default", "Run directory holding one artifact per stage.")
    seed: int = Field(0, description="Random seed for everything the stage samples.")
    wait: bool = nohash(
        False,
        "When another run is writing the same out_dir: wait for it to finish (true) or stop at once naming it (false).",
    )
    verify: Literal["auto", "sizes", "full"] = nohash(
        "auto",
        "How a cached artifact is checked before it is reused: sizes (every file's size), full (sizes and "
        "checksums), auto (full when the artifact holds under 1 GB, sizes above).",
    )

    #: stage name, set by each subclass
    stage: ClassVar[str] = ""

    def resolved_out_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        return Path(self.run_dir) / f"{STAGE_NUMBER[self.stage]:02d}_{self.stage}"


# --------------------------------------------------------------------------------------- vocab
class VocabConfig(StageConfig):
    """Expand a tokenizer: a LLaMA SentencePiece one with the pieces of another SentencePiece model, or a
    byte-level BPE one (Llama-3, Qwen) with tokens and merges learned on a new-language ``corpus``."""

    stage: ClassVar[str] = "vocab"
    base_tokenizer: Optional[str] = Field(None, description="LLaMA tokenizer dir or tokenizer.model file.")
    extra_sp_model: Optional[str] = Field(None, description="SentencePiece model whose pieces are added.")
    mode: Literal["chinese-llama", "minima"] = Field(
        "minima",
        description="chinese-llama: append every missing piece with score 0 (changes English splits). "
        "minima: append only CJK pieces below the base's lowest score, then pad.",
    )
    pad_to_multiple_of: int = Field(64, ge=1, description="minima mode: pad the vocab to a multiple of this.")
    base_model: Optional[str] = Field(None, description="Optional HF causal LM to resize to the new vocab.")
    embedding_init: Literal["mean", "normal", "mean-of-subtokens"] = Field(
        "mean", description="How new embedding/lm_head rows are initialised."
    )
    sample_texts: list[str] = Field(
        default_factory=list,
        description="UTF-8 text files, one sample per line, for the tokens-per-character report and the "
        "AutoTokenizer == SentencePiece self-check; a line is Chinese when CJK is >= 30% of its non-space "
        "characters, English when it has no CJK (mixed lines are only self-checked). Default: built-in samples.",
    )
    corpus: list[str] = Field(
        default_factory=list,
        description="Byte-level BPE base: UTF-8 text files of the new language; new tokens and merges are learned "
        "on them with the base's normalizer and pre-tokenizer.",
    )
    new_tokens: int = Field(1000, ge=1, description="Byte-level BPE base: at most this many tokens are added.")
    min_frequency: int = Field(2, ge=1, description="Byte-level BPE base: a learned merge needs this many uses.")
    max_corpus_lines: int = Field(
        200_000, ge=1, description="Byte-level BPE base: at most this many corpus lines are read (from the start)."
    )
    zero_scores: bool = Field(
        False,
        description="chinese-llama: give every added piece the literal score 0 (Chinese-LLaMA's tokenizer.model, "
        "bit for bit). SentencePiece breaks equal-score ties by position, which no tokenizer.json can express, "
        "so AutoTokenizer then differs from SentencePiece on many Chinese texts (reported, not raised). "
        "Default: distinct scores from 0 down towards the base's highest score, in the extra model's order: "
        "still above every base merge, and AutoTokenizer matches SentencePiece exactly.",
    )

    @field_validator("sample_texts", "corpus", mode="before")
    @classmethod
    def _sample_texts(cls, v):
        # CLI overrides of list[str] fields arrive as raw text: accept "[a, b]" and "a,b"
        if isinstance(v, str):
            import yaml

            try:
                parsed = yaml.safe_load(v)
            except yaml.YAMLError:
                parsed = None
            return parsed if isinstance(parsed, list) else [s.strip() for s in v.split(",") if s.strip()]
        return v


# ------------------------------------------------------------------------------------- records
class Source(Closed):
    """One named input source for the records stage."""

    name: str = Field(..., description="Source name used in the report.")
    path: str = Field(..., description="File path or glob.")
    size: Union[int, str] = Field(
        "all", description="'all', an integer document count, or 'N%' of the source's documents."
    )
    weight: Optional[float] = Field(
        None, gt=0, description="Ratio-mixing weight (instead of size): share of the mixed documents."
    )
    text_key: Optional[str] = Field(None, description="Override of the stage's text_key for this source.")
    shape: Literal["auto", "minichat", "sharegpt", "alpaca", "messages", "mc", "instruction"] = Field(
        "auto",
        description="format=chat: the records' conversation shape (auto = detect per record); with a loader, "
        "instruction writes an mc record's choices into the user text instead of the mc prompt layout.",
    )
    loader: Optional[str] = Field(
        None,
        description="format=chat: a named raw-dataset loader (arc, mmlu, winogrande, gsm8k, cot-collection, "
        "openorca-mc, dolly, firefly, gpt4all, cot, oig); default: the one the source's name selects, if any "
        "(none: no loader).",
    )
    columns: Optional[dict[str, str]] = Field(
        None,
        description="format=chat: raw column names for prompt/query/response/history/system, or messages with "
        "role_tag/content_tag/user_tag/assistant_tag/system_tag.",
    )

    @model_validator(mode="after")
    def _size_or_weight(self):
        if self.weight is not None and self.size != "all":
            raise ValueError(f"source {self.name!r}: give size={self.size!r} or weight={self.weight}, not both")
        return self

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        if isinstance(v, int):
            if v < 0:
                raise ValueError(f"size={v} must be >= 0")
            return v
        s = str(v).strip()
        if s == "all":
            return s
        if s.endswith("%"):
            try:
                pct = float(s[:-1])
            except ValueError:
                raise ValueError(f"size={s!r} is not a percentage like '10%'") from None
            if not 0 < pct <= 100:
                raise ValueError(f"size={s!r} must be in (0%, 100%]")
            return s
        if s.isdigit():
            return int(s)
        raise ValueError(f"size={s!r}: use 'all', an integer count, or 'N%'")


class RecordsConfig(StageConfig):
    """Tokenize text or chat sources into TFRecord shards (train + dev)."""

    stage: ClassVar[str] = "records"
    inputs: Union[str, list[Source], None] = Field(None, description="A glob, or a list of named sources.")
    tokenizer: Optional[str] = Field(None, description="HF tokenizer directory (e.g. the vocab stage output).")
    format: Literal["lm", "chat", "preference"] = Field(
        "lm",
        description="lm: packed token records; chat: one conversation per record with a loss mask; preference: "
        "one (prompt, chosen, rejected) pair per record for dpo.",
    )
    chat_format: str = Field(
        "minichat", description="Chat format from the format registry (format=chat, and preference with a template)."
    )
    max_length: int = Field(
        2048, ge=8, description="Tokens per record (lm) / maximum tokens (chat) / prompt + response (preference)."
    )
    max_prompt_length: int = Field(
        512,
        ge=1,
        description="format=preference: prompt tokens kept (the last ones; a leading BOS stays); the responses are "
        "then cut to max_length minus the prompt.",
    )
    preference_template: Literal["chat", "plain"] = Field(
        "chat",
        description="format=preference: chat renders prompt and responses with chat_format as sft does (sft "
        "models); plain tokenizes the prompt and completion texts as they are, BOS before the prompt and EOS "
        "after each response (base models).",
    )
    num_workers: int = nohash(1, "Tokenizer processes. Output bytes do not depend on it.", ge=1)
    shard_size: int = Field(10000, ge=1, description="Records per TFRecord shard.")
    dev_fraction: float = Field(0.01, ge=0, lt=1, description="Fraction of records held out as the dev split.")
    text_key: str = Field("text", description="Field holding the text in json/jsonl/parquet/csv inputs.")
    lowercase: bool = Field(False, description="Lowercase text before tokenizing (MiniMA --do_lower_case).")
    on_error: Literal["raise", "skip"] = Field("raise", description="Malformed input: stop (raise) or count and skip.")
    add_bos: bool = Field(True, description="lm: prepend BOS to each document.")
    txt_document: Literal["line", "file"] = Field(
        "line", description=".txt inputs: one document per line, or one per file."
    )
    overflow: Literal["truncate", "drop"] = Field(
        "truncate",
        description="chat: a conversation over max_length keeps its leading whole exchanges (truncate) or is dropped.",
    )
    shuffle: bool = Field(
        True, description="Shuffle documents (seeded) after mixing so records mix sources; false keeps input order."
    )
    chunk_size: int = nohash(
        1024, "Documents per tokenizer batch sent to a worker (output does not depend on it).", ge=1
    )

    @model_validator(mode="after")
    def _preference_lengths(self):
        if self.format == "preference" and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length={self.max_prompt_length} leaves no room for the responses in "
                f"max_length={self.max_length}; make max_prompt_length < max_length"
            )
        return self


# --------------------------------------------------------------------------------------- train
class LossConfig(Closed):
    """Distillation loss per token: alpha * CE(hard labels) + (1 - alpha) * T^2 * KD(teacher_T, student_T)."""

    alpha: float = Field(0.0, ge=0, le=1, description="Weight of the hard-label cross entropy (MiniMA: 0.5).")
    kd: Literal["forward_kl", "reverse_kl", "jsd", "soft_ce"] = Field(
        "forward_kl",
        description="KD term: forward_kl KL(teacher||student) (Minitron), reverse_kl, jsd, "
        "or soft_ce -sum p_teacher log p_student (MiniMA; forward KL + teacher entropy, same gradient).",
    )
    temperature: float = Field(
        1.0,
        gt=0,
        description="Softmax temperature of both teacher and student in the KD term; the term is "
        "multiplied by T^2 so its gradient scale does not shrink like 1/T^2 (Hinton et al.). The CE term uses T=1.",
    )
    jsd_beta: float = Field(
        0.5,
        ge=0,
        le=1,
        description="kd=jsd: generalized JSD weight beta (GKD): beta KL(p||m) + (1-beta) KL(q||m), "
        "m = beta p + (1-beta) q; 0 is forward KL, 1 reverse KL, 0.5 the plain JSD.",
    )
    hidden_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of the intermediate-state term (Minitron): mean over mapped layers of the per-token "
        "distance between the student's and the teacher's hidden states, added to the loss. Needs the live teacher.",
    )
    hidden_layers: Optional[dict[int, int]] = Field(
        None,
        description="Student -> teacher layer map for the hidden term (1-based block outputs, e.g. {1: 2, 2: 4}); "
        "None maps every student layer i to teacher layer round(i * L_teacher / L_student).",
    )
    hidden_kind: Literal["mse", "cosine"] = Field(
        "mse", description="Hidden-state distance: mse (mean over the width) or cosine (1 - cosine similarity)."
    )
    on_policy_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of micro-batches (GKD's lambda) where the student samples continuations of record "
        "prefixes and the teacher scores them; the KD term then runs on the sampled tokens only.",
    )
    on_policy_tokens: int = Field(32, ge=1, description="Tokens the student samples per on-policy continuation.")
    on_policy_temperature: float = Field(1.0, gt=0, description="Sampling temperature of on-policy continuations.")


class LoraConfig(Closed):
    """LoRA adapters (peft)."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    r: int = Field(8, ge=1, description="Rank.")
    alpha: int = Field(16, ge=1, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear module names to adapt (MiniMA's set by default).",
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="Fully trained modules, e.g. lm_head, embed_tokens."
    )
    merge: bool = Field(True, description="Export a merged plain HF dir (else an adapter dir).")
    qlora: bool = Field(False, description="4-bit base weights (needs bitsandbytes and a GPU).")


def attn_field() -> Any:
    """``attn_implementation``: the attention kernel a stage's models run with (a speed setting, not hashed)."""
    return nohash(
        None,
        "Attention kernel: sdpa, flash_attention_2 (needs flash-attn and a GPU) or eager; None = transformers' "
        "default (sdpa where the family has it).",
    )


AttnImpl = Optional[Literal["sdpa", "flash_attention_2", "eager"]]


class LaunchConfig(Closed):
    """How a stage's job is started (the training stages, prune, evaluate and the logit cache)."""

    launcher: Literal["local", "slurm", "ssh"] = nohash(
        "local", "local: torchrun here; slurm: sbatch; ssh: deepspeed launcher + hostfile."
    )
    nproc_per_node: int = nohash(1, "local: processes per node.", ge=1)
    nnodes: int = nohash(1, "Number of nodes.", ge=1)
    node_rank: int = nohash(0, "This node's rank.", ge=0)
    master_addr: str = nohash("127.0.0.1", "Rendezvous address.")
    master_port: Optional[int] = nohash(
        None,
        "Rendezvous port (the hang guard uses +1). Default: derived from the Slurm job id, else 29500.",
        ge=1,
        le=65534,
    )
    hostfile: Optional[str] = nohash(None, "ssh launcher: DeepSpeed hostfile.")
    gpus_per_node: int = nohash(8, "slurm/ssh: GPUs (ranks) per node.", ge=1)
    gpu: Literal["H100-80G", "A100-80G", "A100-40G", "H200"] = nohash(
        "H100-80G", "slurm/ssh: the nodes' GPU; the pre-launch memory check plans for gpus_per_node x nnodes of it."
    )
    join_timeout_s: int = nohash(
        900,
        "Hang guard: seconds node 0 waits for every node to check in (on master_port + 1); "
        "the error names the missing node.",
        ge=1,
    )
    collective_timeout_s: int = nohash(
        1800,
        "Seconds any collective may wait (slow weight loads, ZeRO-3 evals, the rank-0 export); "
        "the error names the rank behind.",
        ge=1,
    )
    partition: Optional[str] = nohash(None, "slurm: --partition.")
    account: Optional[str] = nohash(None, "slurm: --account.")
    time: Optional[str] = nohash(None, "slurm: --time limit, e.g. 2-00:00:00.")
    mem: Optional[str] = nohash(None, "slurm: --mem per node, e.g. 0 (all) or 900G.")
    cpus_per_task: Optional[int] = nohash(
        None, "slurm: --cpus-per-task of the one task per node (default: 8 per GPU).", ge=1
    )

    @model_validator(mode="after")
    def _ranks(self):
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank={self.node_rank} must be < nnodes={self.nnodes}")
        return self


class TrainConfig(StageConfig):
    """Engine options shared by adapt, distill and sft."""

    model: Optional[str] = Field(None, description="HF model directory to start from.")
    records: Optional[str] = Field(None, description="Records artifact directory (train/ and dev/ splits).")
    strategy: Literal["deepspeed", "fsdp"] = Field(
        "deepspeed",
        description="deepspeed: DeepSpeed ZeRO (ds_config, zero_stage); fsdp: torch FSDP2, each transformer block "
        "sharded over all ranks (bf16 or fp32; ds_config and zero_stage unused). Same loop, schedule and checkpoints.",
    )
    ds_config: str = Field(
        "ds_config.json",
        description="DeepSpeed config (strategy=deepspeed); 'auto' fields are filled from this config.",
    )
    zero_stage: Optional[int] = Field(
        None, ge=0, le=3, description="Override the ds_config ZeRO stage (strategy=deepspeed)."
    )
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="Training precision (CPU runs use fp32 unless bf16 is asked for)."
    )
    micro_batch_size: int = Field(4, ge=1, description="Sequences per rank per micro step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro steps per optimizer step.")
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps; -1 = epochs over the data.")
    epochs: float = Field(1.0, gt=0, description="Passes over the data when max_steps = -1.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    lr_schedule: Literal["cosine", "linear", "constant", "wsd"] = Field(
        "cosine",
        description="After warmup: cosine or linear decay to min_lr_ratio, constant, or wsd (warmup-stable-decay: "
        "the peak until the last decay_proportion of steps, then linear to min_lr_ratio). Same under both strategies.",
    )
    decay_proportion: float = Field(
        0.1, gt=0, le=1, description="lr_schedule=wsd: the share of all steps spent decaying at the end."
    )
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="Final lr as a fraction of the peak (cosine, linear and wsd)."
    )
    warmup_proportion: float = Field(0.01, ge=0, lt=1, description="Warmup steps as a fraction of all steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clip (0 = off).")
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    eval_steps: int = nohash(0, "Dev loss every N steps (0 = only at the end).", ge=0)
    eval_per_epoch: bool = nohash(
        False,
        "Dev loss also at the end of every epoch (the step where the k-th pass over the train records ends), "
        "so patience counts epochs (MiniChat's num_patience_epochs).",
    )
    save_steps: int = nohash(0, "Checkpoint every N steps (0 = only at the end).", ge=0)
    keep_last: int = nohash(2, "Checkpoints kept.", ge=1)
    patience: int = Field(
        0,
        ge=0,
        description="Stop after N evaluations without dev-loss improvement (0 = off); the best checkpoint is exported.",
    )
    log_steps: int = nohash(1, "Step line every N steps.", ge=1)
    eval_tasks: list[str] = Field(
        default_factory=list,
        json_schema_extra={"hash": False},
        description="Benchmark tasks (minima evaluate names, e.g. [mmlu, ceval]; the JAX recipe's "
        "evaluation_datasets) scored at every dev evaluation (eval_steps and the last step) and logged to "
        "metrics.jsonl/TensorBoard as eval/<task>/<metric>. Empty = off. Chat (judged) tasks are not allowed here.",
    )
    eval_shots: Optional[Union[int, dict[str, int]]] = nohash(
        None,
        "Few-shot count of eval_tasks (the JAX recipe's evaluation_shots): one int for every task, or per task "
        "({mmlu: 5, gsm8k: 8}; a task left out gets its standard count); None = each task's standard count.",
    )
    eval_limit: Optional[int] = nohash(
        100,
        "eval_tasks: items per task (per subject for mmlu/ceval/cmmlu), to keep training evals quick; None = all.",
        ge=1,
    )
    eval_data_dir: Optional[str] = nohash(
        None, "eval_tasks: benchmark data root, one folder per task (default ../shared/data/eval when present)."
    )
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="Launcher settings.")
    attn_implementation: AttnImpl = attn_field()
    compile: bool = nohash(False, "torch.compile each transformer block (GPU; the first steps are slower).")

    @field_validator("max_steps")
    @classmethod
    def _max_steps(cls, v):
        if v == 0:
            raise ValueError("max_steps=0 trains nothing; use -1 (epochs over the data) or a positive step count")
        return v

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas={list(v)} must both be in [0, 1)")
        return v

    @field_validator("eval_tasks", mode="before")
    @classmethod
    def _eval_tasks(cls, v):
        # `eval_tasks=mmlu,ceval` on the command line arrives as one string
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v

    @field_validator("eval_shots")
    @classmethod
    def _eval_shots(cls, v):
        counts = v.values() if isinstance(v, dict) else [] if v is None else [v]
        if any(n < 0 for n in counts):
            raise ValueError(f"eval_shots={v} must be >= 0")
        return v

    @model_validator(mode="after")
    def _eval_shots_tasks(self):
        if isinstance(self.eval_shots, dict):
            unknown = sorted(set(self.eval_shots) - set(self.eval_tasks))
            if unknown:
                raise ValueError(f"eval_shots names {', '.join(unknown)}, which eval_tasks does not list")
        return self

    @model_validator(mode="after")
    def _strategy_precision(self):
        if self.strategy == "fsdp" and self.precision == "fp16":
            raise ValueError("strategy=fsdp trains in bf16 or fp32; use precision=bf16, or strategy=deepspeed for fp16")
        return self


class AdaptConfig(TrainConfig):
    """Continued pretraining on format=lm records."""

    stage: ClassVar[str] = "adapt"
    train_only_new_embeddings: bool = Field(
        False, description="Chinese-LLaMA phase 1: train only the embedding/lm_head rows of new tokens."
    )
    new_token_start: Optional[int] = Field(
        None, ge=1, description="First new token id (default: read from the vocab artifact's manifest)."
    )


class DistillConfig(TrainConfig):
    """Teacher-student distillation of the (pruned) student."""

    stage: ClassVar[str] = "distill"
    teacher: Optional[str] = Field(None, description="Teacher HF directory.")
    student: Optional[str] = Field(None, description="Student HF directory (e.g. the prune output).")
    loss: LossConfig = Field(default_factory=LossConfig, description="Loss mix.")
    teacher_zero3: bool = Field(False, description="Shard the teacher with ZeRO-3 inference (else replicated).")
    vocab_chunk: int = Field(
        0,
        ge=0,
        description="Vocab columns per chunk of the fused KD + CE loss; its fp32 "
        "temporaries are [tokens, chunk]. 0 = auto: 1024 on CPU, 8192 on GPU.",
    )
    cache_logits: bool = Field(False, description="Run the teacher once, store sparse targets, train from the cache.")
    cache_top_k: int = Field(
        64,
        ge=1,
        description="Cached targets per position: top_k: the teacher's k largest logits "
        "plus the rest's mass; sampled: the number of draws.",
    )
    cache_mode: Literal["top_k", "sampled"] = Field(
        "top_k",
        description="top_k (a (k+1)-bucket KD: exact at k = vocab, "
        "a lower bound below it, see minima/kd.py) or sampled tokens with "
        "importance weights (unbiased; forward_kl and soft_ce only).",
    )
    cache_proposal_power: float = Field(
        1.0,
        gt=0,
        le=1,
        description="sampled: draw from p^beta (renormalised); "
        "beta < 1 covers more of the tail, importance weights keep it unbiased.",
    )
    cache_dtype: Literal["fp16", "fp32"] = Field(
        "fp16",
        description="Storage dtype of cached logits / weights "
        "(top-k logits are stored relative to the top-1, so fp16 stays precise).",
    )
    cache_dir: Optional[str] = nohash(
        None,
        "Logit cache artifact (from `minima distill-cache`). Default: "
        "<run_dir>/05_distill_cache, built first when cache_logits is set.",
    )
    cache_device: str = nohash("auto", "distill-cache: cuda, cpu or auto.")

    @model_validator(mode="after")
    def _student_is_model(self):
        # The engine trains ``model``; distill calls it the student. Both name the same dir, so the
        # config is complete (and hashed) the same way whichever one was set.
        if self.student and self.model and Path(self.student).resolve() != Path(self.model).resolve():
            raise ValueError(f"student={self.student} and model={self.model} disagree; set only student")
        if self.student != self.model:
            # a plain write: validate_assignment would run this validator again
            self.__dict__["student"] = self.__dict__["model"] = self.student or self.model
        return self


class DistillCacheConfig(StageConfig):
    """The logit cache: the teacher run once over the records, sparse targets stored per position.

    Built by ``minima distill-cache`` (or ``minima distill cache_logits=true``) from the distill config;
    only the fields that change the cache's bytes are here, so the cache is reused across distill runs.
    """

    stage: ClassVar[str] = "distill-cache"
    teacher: Optional[str] = Field(None, description="Teacher HF directory.")
    records: Optional[str] = Field(None, description="Records artifact directory (train/ and dev/ splits).")
    mode: Literal["top_k", "sampled"] = Field("top_k", description="Target kind (see DistillConfig.cache_mode).")
    top_k: int = Field(64, ge=1, description="k logits (top_k) or draws (sampled) per position.")
    temperature: float = Field(1.0, gt=0, description="Temperature the rest mass / samples are computed at.")
    proposal_power: float = Field(1.0, gt=0, le=1, description="sampled: proposal p^beta.")
    dtype: Literal["fp16", "fp32"] = Field("fp16", description="Storage dtype of logits / weights.")
    batch_size: int = nohash(8, "Records per teacher forward.", ge=1)
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="Teacher precision on GPU (CPU runs fp32).")
    device: str = nohash("auto", "cuda, cpu or auto.")
    attn_implementation: AttnImpl = attn_field()
    launch: LaunchConfig = Field(
        default_factory=LaunchConfig,
        json_schema_extra={"hash": False},
        description="Where the cache build runs, with a training stage's launch keys: local runs it here "
        "(a torchrun job when nproc_per_node > 1); slurm or ssh send it to every GPU of the nodes. Each rank "
        "takes its share of the shards.",
    )

    def resolved_out_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        return Path(self.run_dir) / f"{STAGE_NUMBER['distill']:02d}_distill_cache"


class SftConfig(TrainConfig):
    """Chat instruction tuning."""

    stage: ClassVar[str] = "sft"
    train_files: list[str] = Field(
        default_factory=list,
        description="Raw chat/instruction files or globs (MiniChat, ShareGPT, Alpaca, messages or mc JSON/JSONL), "
        "built through the records stage into <out_dir>.records, instead of records.",
    )
    dev_fraction: float = Field(
        0.05, ge=0, lt=1, description="train_files: fraction of conversations held out as the dev split."
    )
    chat_format: str = Field(
        "minichat",
        description="Chat format from the registry: minichat, alpaca, instruction, mc, llama2-chat, chatml, tulu.",
    )
    loss_on: Literal["assistant", "all", "last-turn"] = Field(
        "assistant",
        description="Which tokens carry labels: assistant replies + their end token (MiniChat), "
        "all tokens (Instruction Modelling's --use_lm_loss), or the last reply only.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA options.")
    neftune_alpha: float = Field(
        0.0, ge=0, description="NEFTune noise alpha (0 = off; the paper uses 5); training only."
    )
    packing: bool = Field(
        False, description="Pack several conversations per sequence (per-document positions, no cross-attention)."
    )
    max_length: int = Field(
        2048, ge=8, description="Max tokens per conversation (train_files builds) and per packed sequence."
    )


class DpoLossConfig(Closed):
    """Preference loss per pair (meanings and defaults as TRL's DPOTrainer / CPOTrainer / ORPOTrainer)."""

    type: Literal["sigmoid", "ipo", "simpo", "orpo"] = Field(
        "sigmoid",
        description="sigmoid: DPO, -log sigmoid(beta * margin of the policy/reference log-ratios); ipo: "
        "(length-normalised log-ratio margin - 1/(2 beta))^2; simpo: reference-free, -log sigmoid(beta * margin of "
        "length-normalised log-probs - gamma); orpo: reference-free, sft_weight * NLL(chosen) - beta * log "
        "sigmoid(log odds ratio).",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="sigmoid: deviation from the reference (higher = closer); ipo: the regulariser tau; simpo: "
        "reward scale; orpo: lambda, the weight of the odds-ratio term.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="sigmoid and simpo: the probability that a preference label is flipped (conservative DPO, "
        "cDPO): -(1-e) log sigmoid(beta d) - e log sigmoid(-beta d).",
    )
    gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin (TRL's simpo_gamma).")
    sft_weight: float = Field(
        1.0,
        ge=0,
        description="orpo: weight of the SFT term, the per-token NLL of the chosen sequence (prompt included, as TRL).",
    )


class DpoConfig(TrainConfig):
    """Preference tuning of a chat model (DPO, IPO, SimPO, ORPO) on preference records."""

    stage: ClassVar[str] = "dpo"
    enabled: bool = nohash(
        False,
        "Pipeline only: run records_pref -> dpo after sft, and evaluate the dpo model too (off by default; "
        "`minima dpo` ignores it).",
    )
    lr: float = Field(1e-6, gt=0, description="Peak learning rate (TRL's DPO default 1e-6; Zephyr 5e-7).")
    loss: DpoLossConfig = Field(default_factory=DpoLossConfig, description="Preference loss.")
    precompute_ref: bool = Field(
        False,
        description="Run the reference model once over the records (a resumable pass, log-probs stored per pair in "
        "the work dir), so training holds one model. Else a frozen copy runs beside the policy (LoRA: the base with "
        "the adapters disabled, no copy). Unused by the reference-free simpo and orpo.",
    )
    ref_zero3: bool = Field(
        False,
        description="Shard the frozen reference with ZeRO-3 inference (strategy=deepspeed), as distill's "
        "teacher_zero3; else it is replicated on every rank.",
    )
    disable_dropout: bool = Field(
        True, description="Set every dropout to 0 in the policy (and reference), as TRL does by default."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA options (the reference is the base).")
    train_files: list[str] = Field(
        default_factory=list,
        description="Raw preference files or globs (prompt/chosen/rejected, UltraFeedback message lists or raw "
        "hh-rlhf), built through the records stage into <out_dir>.records, instead of records.",
    )
    dev_fraction: float = Field(
        0.05, ge=0, lt=1, description="train_files: fraction of pairs held out as the dev split."
    )
    chat_format: str = Field(
        "minichat", description="Chat format of the model (train_files builds; checked against the records)."
    )
    preference_template: Literal["chat", "plain"] = Field(
        "chat", description="train_files: chat (the format's template) or plain text for base models."
    )
    max_length: int = Field(1024, ge=8, description="train_files: prompt + response tokens per sequence (TRL 1024).")
    max_prompt_length: int = Field(
        512, ge=1, description="train_files: prompt tokens kept, from the right (TRL's former default 512)."
    )

    @model_validator(mode="after")
    def _dpo_options(self):
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length={self.max_prompt_length} must be < max_length={self.max_length}")
        if self.precompute_ref and self.loss.type in ("simpo", "orpo"):
            raise ValueError(f"loss.type={self.loss.type} is reference-free; precompute_ref has nothing to compute")
        if self.loss.label_smoothing > 0 and self.loss.type not in ("sigmoid", "simpo"):
            raise ValueError(f"loss.label_smoothing applies to sigmoid and simpo, not {self.loss.type}; set it to 0")
        return self

    def reference_free(self) -> bool:
        """simpo and orpo need no reference model."""
        return self.loss.type in ("simpo", "orpo")


# -------------------------------------------------------------------------------------- prune
class PruneSearchConfig(Closed):
    """Shape search under a parameter budget (used when ``target_params`` is set)."""

    tolerance: float = Field(0.01, gt=0, lt=1, description="Candidates within target_params * (1 +- tolerance).")
    top_k: int = Field(3, ge=1, description="Candidates (best calibration loss after pruning) that are retrained.")
    retrain_steps: int = Field(
        20, ge=0, description="Short distill steps per retrained candidate (0: rank by the loss right after pruning)."
    )
    multiple: int = Field(
        128,
        ge=1,
        description="Granularity of hidden and FFN sizes (64/128 suit GPUs); halved until the teacher's size is a "
        "multiple with at least 4 steps, so tiny teachers search at a finer grain.",
    )
    min_ratio: float = Field(
        0.5, gt=0, le=1, description="No dim below this fraction of the teacher's (ModelOpt: beyond ~50% is hard)."
    )
    max_candidates: int = Field(32, ge=1, description="At most this many candidates are scored (spread evenly).")
    score_samples: int = Field(
        32, ge=1, description="Calibration sequences held out to score candidates (the rest retrain them)."
    )
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the retraining steps.")
    alpha: float = Field(0.0, ge=0, le=1, description="Hard-label CE weight of the retraining loss.")
    kd: Literal["forward_kl", "reverse_kl", "jsd", "soft_ce"] = Field("forward_kl", description="Retraining KD term.")
    temperature: float = Field(1.0, gt=0, description="Retraining KD temperature.")
    keep: Literal["retrained", "pruned"] = Field(
        "retrained", description="Save the winner after its retraining steps, or its freshly pruned weights."
    )
    logit_cache: Optional[str] = Field(
        None,
        description="A distill logit cache built over the same records and teacher (minima distill-cache): the "
        "retraining steps then train against its targets instead of running the teacher.",
    )


class PruneConfig(StageConfig):
    """Structured pruning of a teacher to a target shape, or a shape search under ``target_params``."""

    stage: ClassVar[str] = "prune"
    teacher: Optional[str] = Field(None, description="Teacher HF directory.")
    records: Optional[str] = Field(None, description="format=lm records used for calibration.")
    num_samples: int = Field(1024, ge=1, description="Calibration sequences.")
    max_length: int = Field(2048, ge=8, description="Calibration sequence length.")
    batch_size: int = Field(8, ge=1, description="Calibration batch size.")
    num_layers: Optional[int] = Field(None, ge=1, description="Target layers (default: teacher's).")
    num_heads: Optional[int] = Field(None, ge=1, description="Target attention heads.")
    num_key_value_heads: Optional[int] = Field(None, ge=1, description="Target KV heads (whole GQA groups are kept).")
    intermediate_size: Optional[int] = Field(None, ge=1, description="Target MLP width.")
    hidden_size: Optional[int] = Field(None, ge=1, description="Target hidden size.")
    importance: Literal["activation", "gradient", "magnitude", "random"] = Field(
        "activation", description="Width importance score."
    )
    init: Literal["pruned", "random"] = Field(
        "pruned",
        description="pruned: the student keeps the teacher's most important weights; random: the same shape and "
        "tokenizer with freshly initialised weights (seeded), the from-scratch baseline. No calibration runs.",
    )
    keep_layers: Optional[list[int]] = Field(None, description="Explicit layer indices to keep (MiniMA: 4..27).")
    layer_importance: Literal["block-influence", "drop_last"] = Field(
        "block-influence", description="How layers are chosen when keep_layers is not given."
    )
    target_params: Optional[float] = Field(
        None,
        gt=0,
        description="Parameter budget (e.g. 3.0e9): search the shape instead of giving dims (see search.*).",
    )
    search: PruneSearchConfig = Field(default_factory=PruneSearchConfig, description="Shape search options.")
    dry_run: bool = nohash(False, "Print the target shape and parameter count without loading weights.")
    dtype: Literal["bf16", "fp16", "fp32"] = Field(
        "fp32", description="Teacher dtype for calibration; the pruned model is saved in it."
    )
    device: str = nohash("auto", "cuda, cpu or auto.")
    attn_implementation: AttnImpl = attn_field()
    launch: LaunchConfig = Field(
        default_factory=LaunchConfig,
        json_schema_extra={"hash": False},
        description="Where the pruning runs, with a training stage's launch keys: local runs it here; slurm or "
        "ssh send it to one GPU of one node as a one-process job, whatever nnodes and gpus_per_node say.",
    )
    rescale_norms: bool = Field(
        False,
        description="Scale RMSNorm weights by sqrt(D/D') and rms_norm_eps by D/D' so that hidden-channel "
        "pruning equals the teacher with those channels zeroed (default off, as in Minitron).",
    )
    vocab_size: Optional[int] = nohash(
        None,
        "dry_run without a teacher dir: the teacher's vocab size (e.g. MiniMA's adapted 49216); default "
        "LLaMA-2's 32000. Ignored when teacher is given (its config.json wins).",
        ge=1,
    )

    @model_validator(mode="after")
    def _shape(self):
        if self.hidden_size and self.num_heads and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads} "
                f"({self.hidden_size} / {self.num_heads} = {self.hidden_size / self.num_heads:.2f}); "
                "pick sizes with hidden_size = num_heads * head_dim"
            )
        if self.num_heads and self.num_key_value_heads and self.num_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_key_value_heads}"
            )
        if self.keep_layers is not None and self.num_layers is not None and len(self.keep_layers) != self.num_layers:
            raise ValueError(f"keep_layers has {len(self.keep_layers)} entries but num_layers={self.num_layers}")
        if self.target_params is not None:
            dims = ("num_layers", "num_heads", "num_key_value_heads", "intermediate_size", "hidden_size")
            given = [k for k in dims if getattr(self, k) is not None] + (["keep_layers"] if self.keep_layers else [])
            if given:
                raise ValueError(
                    f"target_params={self.target_params:g} searches the shape, but {', '.join(given)} "
                    "also set it; give either the budget or the dims (set them to null where a preset gives "
                    "them, e.g. num_layers=null keep_layers=null)"
                )
        return self


# ----------------------------------------------------------------------------------- evaluate
class TaskSpec(Closed):
    """Per-task overrides (``tasks.<name>.<field>=...``)."""

    path: Optional[str] = Field(None, description="Folder, file or glob for this task (overrides data_dir/<task>).")
    shots: Optional[int] = Field(
        None,
        ge=0,
        description="Few-shot count for this task (default: the evaluate shots, else the task's standard count).",
    )
    limit: Optional[int] = Field(None, ge=1, description="Items per task (per subject for mmlu/ceval/cmmlu).")
    subjects: Optional[list[str]] = Field(None, description="mmlu/ceval/cmmlu/bbh: evaluate only these subjects.")
    split: Optional[str] = Field(
        None, description="Split to evaluate (default: test if present with labels, else val)."
    )
    format: Optional[str] = Field(
        None, description="Force the file format when detection is ambiguous (e.g. llmfoundry, original, hf)."
    )
    mode: Optional[Literal["loglikelihood", "letter"]] = Field(
        None,
        description="Multiple choice scoring: loglikelihood of each choice (lm-eval) or next-token A/B/C/D "
        "logits (hendrycks 'Answer: X').",
    )
    max_length: Optional[int] = Field(
        None, ge=2, description="perplexity: window in tokens (default: the model's context length)."
    )
    stride: Optional[int] = Field(
        None, ge=1, description="perplexity: tokens the window advances (default: max_length // 2)."
    )
    num_samples: Optional[int] = Field(
        None, ge=1, description="humaneval: completions per problem (1 = greedy pass@1)."
    )
    temperature: Optional[float] = Field(
        None, ge=0, description="humaneval: sampling temperature when num_samples > 1 (default 0.8)."
    )
    timeout_s: Optional[float] = Field(None, gt=0, description="humaneval: seconds per program (default 10).")


class EvaluateConfig(StageConfig):
    """Benchmarks on an HF model directory."""

    stage: ClassVar[str] = "evaluate"
    model: Optional[str] = Field(None, description="HF model directory.")
    models: dict[str, str] = Field(
        default_factory=dict,
        description="Several named models (name -> dir) evaluated in one artifact and compared side by side.",
    )
    tasks: Union[list[str], dict[str, TaskSpec]] = Field(
        default_factory=lambda: ["mmlu", "arc_easy", "hellaswag", "winogrande"],
        description="Task names, or name -> overrides. Tasks: mmlu ceval cmmlu arc_easy arc_challenge hellaswag "
        "winogrande gsm8k bbh drop humaneval perplexity demo_mc demo_qa; LLM-judged chat tasks (need judge_model): "
        "mt_bench belle_eval zbench vicuna_bench alpaca_eval.",
    )
    shots: Optional[int] = Field(
        None,
        ge=0,
        description="Few-shot count for every task (default: each task's standard count, e.g. mmlu 5, gsm8k 8).",
    )
    limit: Optional[int] = Field(None, ge=1, description="Items per task (per subject for mmlu/ceval/cmmlu).")
    batch_size: int = nohash(16, "Contexts per forward pass (each with all its choices).", ge=1)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPU (fp16 where bf16 is unsupported), fp32 on CPU."
    )
    device: str = nohash("auto", "cuda, cuda:N, cpu or auto.")
    attn_implementation: AttnImpl = attn_field()
    launch: LaunchConfig = Field(
        default_factory=LaunchConfig,
        json_schema_extra={"hash": False},
        description="Where the evaluation runs, with a training stage's launch keys: local runs it here (a "
        "torchrun job when nproc_per_node > 1); slurm or ssh send it to every GPU of the nodes. The items are "
        "split across ranks.",
    )
    data_dir: Optional[str] = Field(
        None, description="Benchmark data root, one folder per task (default ../shared/data/eval when present)."
    )
    mode: Literal["loglikelihood", "letter"] = Field(
        "loglikelihood", description="Default multiple choice scoring for mmlu/ceval/cmmlu (see TaskSpec.mode)."
    )
    chat_template: bool = Field(False, description="Wrap prompts in the model's chat template.")
    chat_models: list[str] = Field(
        default_factory=list,
        description="Names in models that are chat models: their prompts are wrapped in their chat template "
        "(chat_template=true for them only), the others are prompted as base models.",
    )
    max_new_tokens: int = Field(256, ge=1, description="Generation tasks: token limit.")
    fewshot_seed: int = Field(
        1234, description="Seed of the few-shot sampler for tasks that draw shots at random (lm-eval's default)."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the checkpoint (off by default).")
    allow_unsafe_code: bool = nohash(
        False,
        "humaneval: run generated programs even where no namespace sandbox (bubblewrap) works here, with only "
        "rlimits and a Python audit hook around them (a warning says what is not isolated). Off: such a host refuses.",
    )
    # LLM-judged chat tasks (mt_bench belle_eval zbench vicuna_bench alpaca_eval; see minima.evaluate.judge)
    judge_base_url: Optional[str] = nohash(
        None,
        "Chat tasks: the judge's OpenAI-compatible endpoint, e.g. http://127.0.0.1:8001/v1 "
        "(default: env OPENAI_BASE_URL). Not hashed: judge_model names the judge, so a rerun "
        "against another address resumes.",
    )
    judge_model: Optional[str] = Field(None, description="Chat tasks: the judge model id at the endpoint (e.g. gpt-4).")
    judge_api_key_env: str = nohash(
        "OPENAI_API_KEY",
        "Chat tasks: name of the env var holding the judge endpoint's key "
        "(the key itself is never stored in a config).",
    )
    judge_max_tokens: int = Field(1024, ge=16, description="Chat tasks: judge reply token limit.")
    judge_concurrency: int = nohash(4, "Chat tasks: judge requests in flight at once.", ge=1)
    chat_mode: Literal["single", "pairwise"] = Field(
        "single",
        description="Chat tasks: single = each answer graded 1-10 (with the set's reference answer where it has one); "
        "pairwise = compared with baseline_answers in both orders, reported as a win rate.",
    )
    baseline_answers: Optional[str] = Field(
        None,
        description="chat_mode=pairwise: the baseline's answers, a FastChat answer JSONL, or a folder with "
        "<task>.jsonl per chat task (alpaca_eval files carry their own baseline outputs).",
    )
    chat_max_new_tokens: int = Field(
        1024, ge=1, description="Chat tasks: the evaluated model's reply token limit per turn."
    )
    chat_temperature: float = Field(
        0.7,
        ge=0,
        le=2,
        description="Chat tasks: sampling temperature of the model's replies (0 = greedy; sampled with seed).",
    )
    answers_only: bool = Field(
        False,
        description="Chat tasks: write the model's answers (chat/<task>/answers/) and make no judge calls; judge "
        "them later with `minima evaluate judge answers=DIR judge_model=...`.",
    )

    @model_validator(mode="after")
    def _one_model(self):
        if self.model and self.models:
            raise ValueError("set either model or models, not both")
        unknown = sorted(set(self.chat_models) - set(self.models))
        if unknown:
            raise ValueError(f"chat_models {unknown} are not names in models ({', '.join(self.models) or 'none'})")
        return self


# ------------------------------------------------------------------------------------- export
class ExportConfig(StageConfig):
    """Export a model dir as GGUF (llama.cpp, Ollama) or a release dir, with a model card and lineage."""

    stage: ClassVar[str] = "export"
    enabled: bool = nohash(
        False, "Pipeline only: run the export step after sft and evaluate (off by default; `minima export` ignores it)."
    )
    model: Optional[str] = Field(None, description="HF model directory to export (any stage's model artifact).")
    format: Literal["gguf", "safetensors"] = Field(
        "gguf", description="gguf: one .gguf file for llama.cpp / Ollama / LM Studio; safetensors: a release dir."
    )
    dtype: Optional[Literal["f16", "bf16", "q8_0"]] = Field(
        None,
        description="Weight type. gguf: f16, bf16 or q8_0 (norms stay f32, as llama.cpp expects); safetensors: bf16 "
        "or f16. Default: f16 for gguf, bf16 for safetensors.",
    )
    evaluation: Optional[str] = Field(
        None,
        description="Evaluate artifact whose scores go into the model card. Default: an evaluate artifact beside "
        "the model (same run dir) that evaluated it, if there is one.",
    )
    name: Optional[str] = Field(
        None, description="Model name in the card and GGUF metadata. Default: <run dir name>-<stage of the model>."
    )
    base_model: Optional[str] = Field(
        None,
        description="Hugging Face id of the original base model for the card's base_model "
        "(e.g. meta-llama/Llama-2-7b-hf). Default: the name of the first model found in the lineage.",
    )
    license: str = Field(
        "other",
        description="License id for the card (e.g. llama2, apache-2.0, mit); 'other' when the base model's terms "
        "govern and you have not named them.",
    )
    language: list[str] = Field(default_factory=lambda: ["en", "zh"], description="Card languages (ISO 639-1).")
    tags: list[str] = Field(
        default_factory=list, description="Extra card tags (minima, the family and format are always there)."
    )
    max_shard_size: str = Field("2GB", description="safetensors: largest shard size (save_pretrained's format).")

    @field_validator("language", "tags", mode="before")
    @classmethod
    def _str_list(cls, v):
        # `tags=a,b` on the command line arrives as one string
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _dtype_fits_format(self):
        if self.format == "safetensors" and self.dtype == "q8_0":
            raise ValueError("dtype=q8_0 is a GGUF type; a safetensors release is bf16 or f16 (or use format=gguf)")
        return self

    def resolved_dtype(self) -> str:
        """The weight type: the one given, else f16 for gguf and bf16 for safetensors."""
        return self.dtype or ("f16" if self.format == "gguf" else "bf16")


STAGE_CONFIGS: dict[str, type[StageConfig]] = {
    "vocab": VocabConfig,
    "records": RecordsConfig,
    "adapt": AdaptConfig,
    "prune": PruneConfig,
    "distill": DistillConfig,
    "sft": SftConfig,
    "dpo": DpoConfig,
    "evaluate": EvaluateConfig,
    "export": ExportConfig,
}


class CompressRound(Closed):
    """One round of iterative compression: prune the previous round's student, then distill it."""

    target_params: Optional[float] = Field(
        None, gt=0, description="Parameter budget of this round's prune (passed to prune as target_params)."
    )
    tokens: Optional[float] = Field(
        None,
        gt=0,
        description="Distillation tokens of this round: distill.max_steps = ceil(tokens / (micro_batch_size x "
        "gradient_accumulation_steps x ranks x records_lm.max_length)). None keeps distill's own max_steps.",
    )
    prune: dict[str, Any] = Field(
        default_factory=dict,
        description="This round's prune settings over the pipeline's prune config, e.g. an explicit shape "
        "{num_layers: 4, hidden_size: 96}.",
    )
    distill: dict[str, Any] = Field(
        default_factory=dict, description="This round's distill settings over the pipeline's distill config."
    )


class CompressConfig(Closed):
    """Iterative compression (Minitron): prune -> distill in rounds, each round its own cached artifacts."""

    rounds: list[CompressRound] = Field(
        default_factory=list,
        description="Rounds in order; empty = one prune and one distill as configured. The last round's "
        "artifacts are the pipeline's prune and distill steps; earlier rounds are steps prune_r<i>, distill_r<i>.",
    )
    teacher: Literal["previous", "original"] = Field(
        "previous",
        description="Teacher of each round's distill: the model that round pruned (previous) or the adapted "
        "teacher (original).",
    )


class PipelineConfig(Closed):
    """The whole DAG. Paths between stages are wired by the flow; set only the raw inputs."""

    run_dir: str = nohash("runs/default", "Run directory.")
    vocab: VocabConfig = Field(default_factory=VocabConfig, description="vocab stage")
    records_lm: RecordsConfig = Field(default_factory=RecordsConfig, description="records stage for pretraining text")
    records_chat: RecordsConfig = Field(
        default_factory=lambda: RecordsConfig(format="chat"), description="records stage for chat data"
    )
    adapt: AdaptConfig = Field(default_factory=AdaptConfig, description="adapt stage")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="prune stage")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="distill stage")
    compress: CompressConfig = Field(
        default_factory=CompressConfig, description="iterative prune -> distill rounds (empty: one shot)"
    )
    sft: SftConfig = Field(default_factory=SftConfig, description="sft stage")
    records_pref: RecordsConfig = Field(
        default_factory=lambda: RecordsConfig(format="preference", max_length=1024),
        description="records stage for preference pairs (runs with dpo)",
    )
    dpo: DpoConfig = Field(
        default_factory=DpoConfig, description="dpo stage (optional: runs, after records_pref, when dpo.enabled)"
    )
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="evaluate stage")
    export: ExportConfig = Field(
        default_factory=ExportConfig, description="export stage (optional: runs when export.enabled is true)"
    )
    scratch: bool = Field(
        False,
        description="Also run the scratch arm: the student's shape randomly initialised (prune init=random) and "
        "distilled with the distill config on the same records for the same steps, evaluated as 'scratch'.",
    )


# ------------------------------------------------------------------------------ dict plumbing
def hash_view(cfg: BaseModel) -> dict:
    """The config as a dict without the fields marked nohash (recursively)."""
    out = {}
    for name, field in type(cfg).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("hash") is False:
            continue
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            value = hash_view(value)
        elif isinstance(value, list):
            value = [hash_view(v) if isinstance(v, BaseModel) else v for v in value]
        elif isinstance(value, dict):
            value = {k: hash_view(v) if isinstance(v, BaseModel) else v for k, v in value.items()}
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


def _field_annotation(model: type[BaseModel], path: list[str]):
    """Walk a dotted path through nested models; return the leaf annotation or raise KeyError."""
    import typing

    cur: Any = model
    for i, key in enumerate(path):
        if isinstance(cur, type) and issubclass(cur, BaseModel):
            fields = cur.model_fields
            if key not in fields:
                close = difflib.get_close_matches(key, list(fields), n=1)
                raise KeyError((".".join(path[: i + 1]), close[0] if close else None, sorted(fields)))
            cur = fields[key].annotation
            continue
        # Unwrap Optional/Union to a model, or dict[str, Model] for name-keyed maps.
        args = [a for a in typing.get_args(cur) if a is not type(None)]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        dicts = [a for a in args if typing.get_origin(a) is dict] + ([cur] if typing.get_origin(cur) is dict else [])
        if models:
            return _field_annotation(models[0], path[i:])
        if dicts:
            vt = typing.get_args(dicts[0])[1]
            if len(path) == i + 1:
                return vt
            return _field_annotation(vt, path[i + 1 :]) if isinstance(vt, type) and issubclass(vt, BaseModel) else vt
        return cur
    return cur


def _wants_str(annotation) -> bool:
    import typing

    if annotation in (str, Path):
        return True
    if typing.get_origin(annotation) in (list, tuple, dict, set):  # list[str] etc. are YAML lists
        return False
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return bool(args) and all(a in (str, Path) for a in args)


def split_key_value(item: str) -> tuple[str, str]:
    """``key=value`` -> ``(key, raw value)``, the value split at the first ``=``; ConfigError without one."""
    if "=" not in item:
        raise ConfigError(f"argument {item!r} is not key=value", fix="write e.g. lr=3e-4 or loss.temperature=2")
    key, raw = item.split("=", 1)
    return key.strip(), raw


def key_values(argv: Optional[list[str]], keys: Optional[Collection[str]] = None) -> dict[str, str]:
    """``key=value`` words -> ``{key: raw value}`` (a later key wins); a key not in ``keys`` is a ConfigError.

    For commands whose options are a few plain strings; configs with typed fields go through
    :func:`command_config`.
    """
    out: dict[str, str] = {}
    for item in argv or []:
        key, raw = split_key_value(item)
        if keys is not None and key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=1)
            raise ConfigError(
                f"unknown key '{key}'", fix=f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(keys)}"
            )
        out[key] = raw
    return out


def parse_override(model: type[BaseModel], item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` against ``model``: check the key exists, coerce the value.

    Values are read as YAML (``3`` -> int, ``[a, b]`` -> list, ``true`` -> bool) unless the field is a
    string field, where the raw text is kept (so ``name=001`` stays ``"001"``).
    """
    import yaml

    key, raw = split_key_value(item)
    path = key.split(".")
    try:
        ann = _field_annotation(model, path)
    except KeyError as e:
        bad, close, valid = e.args[0]
        hint = f"did you mean '{close}'?" if close else f"valid keys: {', '.join(valid)}"
        raise ConfigError(f"unknown config key '{bad}' for {model.__name__}", fix=hint) from None
    if _wants_str(ann):
        value: Any = raw
    else:
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
    return path, value


def set_dotted(d: dict, path: list[str], value: Any) -> None:
    cur = d
    for k in path[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {} if nxt is None else (nxt.model_dump() if isinstance(nxt, BaseModel) else nxt)
            if not isinstance(nxt, dict):  # e.g. evaluate.tasks given as a list, now keyed
                nxt = {name: {} for name in nxt} if isinstance(nxt, list) else {}
            cur[k] = nxt
        cur = nxt
    cur[path[-1]] = value


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def format_validation_error(model: type[BaseModel], err: ValidationError) -> ConfigError:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        top = loc.split(".")[-1]
        valid = list(model.model_fields)
        close = difflib.get_close_matches(top, valid, n=1)
        return ConfigError(
            f"unknown config key '{loc}' for {model.__name__}",
            fix=f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}",
        )
    value = first.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
    return ConfigError(
        f"{msg}{shown}",
        where=f"{model.__name__}.{loc}" if loc else model.__name__,
        fix="correct the value in the config file or override",
    )


def build(model: type[BaseModel], base: dict | None = None, file: str | None = None, overrides: list[str] = ()) -> Any:
    """Build a config from a base dict (preset), a YAML file and ``key=value`` overrides, in that order."""
    import yaml

    data: dict = dict(base or {})
    if file:
        p = Path(file)
        if not p.is_file():
            raise ConfigError(f"config file not found: {file}", fix="check the --config path")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{file}:{mark.line + 1}" if mark else file
            raise ConfigError(
                f"invalid YAML: {getattr(e, 'problem', e)}", where=where, fix="fix the YAML syntax"
            ) from None
        if not isinstance(loaded, dict):
            raise ConfigError("config file must hold a mapping of fields", where=file)
        data = deep_merge(data, loaded)
    for item in overrides:
        path, value = parse_override(model, item)
        set_dotted(data, path, value)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise format_validation_error(model, e) from None


def command_config(model: type[BaseModel], argv: Optional[list[str]], doc: str) -> Optional[Any]:
    """The config of a ``key=value`` command (``--config FILE`` allowed); None after printing ``--help``."""
    argv = list(argv or [])
    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip().split("\n\n")[0])
        for name, f in model.model_fields.items():
            default = f.default_factory() if f.default_factory else f.default
            print(f"  {name:<24}{f.description} ({'required' if f.is_required() else f'default: {default}'})")
        return None
    file = None
    if "--config" in argv:
        i = argv.index("--config")
        file = argv[i + 1] if i + 1 < len(argv) else None
        del argv[i : i + 2]
    return build(model, file=file, overrides=argv)


def to_yaml(cfg: BaseModel) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
