"""Mutation score of the modules where a wrong number is silent (mutmut), written to RESULTS.md.

Each target names a source file, the functions in it that compute numbers (only those are mutated) and
the fast unit tests that guard them. mutmut runs in a scratch copy of the repository (so this checkout
is never modified), maps every test to the functions it calls, and runs only those tests against each
mutant, one mutant at a time (the machine is shared). The section lists the score per target and every
surviving mutant as a diff; ``EXPLAINED`` gives the reason a known survivor is equivalent or harmless.

Run by hand, never in the suite::

    python benchmarks/mutation.py                 # every target (tens of minutes on 2 cores)
    python benchmarks/mutation.py --only metrics  # one target
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import RESULTS, machine, write_section

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = Path(sys.executable).with_name("mutmut")


@dataclass
class Target:
    """A file, the number-computing functions in it (``Class.method`` for methods) and their fast tests."""

    file: str
    functions: list[str]
    tests: list[str]


TARGETS: dict[str, Target] = {
    "lm loss": Target(
        "minima/train/recipe.py",
        ["causal_lm_loss_sum"],
        [
            "tests/test_kd.py::test_chunked_lm_loss_equals_dense_cross_entropy",
            "tests/test_train_engine.py::test_lm_loss_and_gradient_equal_fp32_cross_entropy",
            "tests/test_mutation_kills.py",
        ],
    ),
    "kd": Target(
        "minima/train/objectives/kd.py",
        [
            "_acc",
            "_chunks",
            "_lse_chunked",
            "_Online.add",
            "_Online.lse",
            "_DenseLoss.forward",
            "_DenseLoss.backward",
            "dense_loss",
            "kd_reference",
            "top_k_targets",
            "_LogitStats.forward",
            "_LogitStats.backward",
            "_ids_mask",
            "_bucket_kd",
            "sparse_loss",
        ],
        ["tests/test_kd.py", "tests/test_mutation_kills.py"],
    ),
    "dpo": Target(
        "minima/train/objectives/dpo.py",
        ["token_logps", "log1mexp", "_smoothed_sigmoid", "preference_losses", "PairLosses.metrics"],
        [
            "tests/test_dpo.py::test_losses_equal_a_hand_computation",
            "tests/test_dpo.py::test_losses_and_rewards_equal_trl",
            "tests/test_mutation_kills.py",
        ],
    ),
    "packing": Target(
        "minima/data/packing.py",
        [
            "pack",
            "concat",
            "collate_packed",
            "varlen_lengths",
            "block_diagonal_mask",
            "model_inputs",
            "PackedDataset.__iter__",
            "PackedDataset.state_dict",
            "PackedDataset.load_state_dict",
        ],
        ["tests/test_packing.py", "tests/test_mutation_kills.py"],
    ),
    "formats": Target(
        "minima/data/formats.py",
        [
            "ChatFormat.segments",
            "ChatFormat.encode_exchanges",
            "ChatFormat.encode_batch",
            "ChatFormat.encode",
            "MiniChatFormat.exchange",
            "MiniChatFormat.generation_prefix",
            "tokenize_texts",
            "normalise_conversation",
            "split_messages",
            "MessageFormat.segments",
        ],
        ["tests/test_formats.py", "tests/test_sft_formats.py", "tests/test_mutation_kills.py"],
    ),
    "records reader": Target(
        "minima/data/records/reader.py",
        [
            "to_sample",
            "collate",
            "shuffle_buffer_order",
            "RecordDataset.state_dict",
            "RecordDataset.load_state_dict",
            "RecordDataset.advance",
            "RecordDataset.epoch_order",
            "RecordDataset.__iter__",
            "RecordDataset.samples_per_epoch",
        ],
        ["tests/test_records_reader.py", "tests/test_mutation_kills.py"],
    ),
    "lora merge": Target(
        "minima/train/lora.py",
        ["apply_lora", "lora_state", "export_lora"],
        ["tests/test_lora.py", "tests/test_mutation_kills.py"],
    ),
    "prune slicing": Target(
        "minima/compress/prune.py",
        ["_top", "choose_layers", "make_plan", "_idx", "_rows", "slice_state_dict", "student_config"],
        [
            "tests/test_prune.py::test_noop_prune_gives_identical_logits",
            "tests/test_prune.py::test_head_and_neuron_pruning_equal_the_teacher_with_those_units_zeroed",
            "tests/test_prune.py::test_layer_drop_equals_the_teacher_with_those_layers_skipped",
            "tests/test_prune.py::test_hidden_channel_pruning_vs_the_masked_teacher",
            "tests/test_prune.py::test_gqa_teacher_keeps_whole_kv_groups",
            "tests/test_mutation_kills.py",
        ],
    ),
    "evaluate metrics": Target(
        "minima/evaluate/metrics.py",
        [
            "mean",
            "stderr",
            "pooled_stderr",
            "unweighted_stderr",
            "argmax",
            "choice_predictions",
            "acc_scores",
            "regex_extract",
            "exact_match",
            "f1",
            "pass_at_k",
            "token_perplexity",
            "bits_per_byte",
        ],
        [
            "tests/test_evaluate.py::test_gsm8k_extraction_and_scoring_match_lm_eval",
            "tests/test_evaluate.py::test_drop_f1_and_em_match_lm_eval",
            "tests/test_evaluate.py::test_pass_at_k_is_the_unbiased_estimator",
            "tests/test_evaluate.py::test_stderr_and_group_aggregation_match_lm_eval",
            "tests/test_mutation_kills.py",
        ],
    ),
}

# A line under the table for targets whose scoring needs a word of explanation.
NOTES: dict[str, str] = {
    "lora merge": (
        "the QLoRA branch of `apply_lora` is scored on CPU: it reads only transformers' `is_loaded_in_4bit` flag, "
        "so a bf16 model carrying that flag stands in for a 4-bit one, and tests/test_lora.py compares the wrapped "
        "model (dtypes, trainable set, gradient checkpointing) with peft's own `prepare_model_for_kbit_training` + "
        "`get_peft_model`. Real 4-bit weights (bitsandbytes, CUDA) are not exercised here."
    ),
}

# Survivors known to be equivalent or harmless: mutant name -> reason. A survivor not listed here is a
# gap in the tests and is printed as such.
_NAN = "equivalent: float() parses 'nan' case-insensitively"
_TF5_SAFE = (
    "equivalent: transformers 5 save_pretrained has no safe_serialization argument (it always writes "
    "safetensors; the keyword is swallowed by **kwargs)"
)
_CHUNK = "equivalent in value: chunking only bounds memory; tests/test_kd.py checks every chunk size gives the same"
_DIM1 = "equivalent: on these 2-D tensors dim +1 is dim -1 (and no dim picks dim 1)"
_CAST = "equivalent: assigning into a slice of grad casts to grad's dtype anyway"
_SAME_DTYPE = "equivalent: the incoming gradient already has the dtype of the output, which is the one cast to"
_NEVER_NONE = "equivalent: autograd materialises zero gradients for outputs that were not used, so it is never None"
_BETA_EDGE = (
    "equivalent: the infinite value is read only by the jsd branch, and jsd reaches the Function only with "
    "0 < beta < 1 (_jsd_kind turns beta 0 and 1 into forward and reverse KL)"
)
_S1_AT_T1 = "equivalent in value: at T = 1 the extra running logsumexp equals the one at T (one more pass)"
_BOOL_MASK = "equivalent: multiplying by the bool mask gives the same values as by its float copy"
_REST_NAN = (
    "equivalent: g_rest is non-finite only where lse_rest is -inf (k = vocab), and the next line zeroes it there"
)
_CPU = "equivalent on CPU, the default device (a GPU run would fail at once on mixed devices)"
EXPLAINED: dict[str, str] = {
    "x_causal_lm_loss_sum__mutmut_20": "equivalent: dense_loss's teacher_logits defaults to None, the value dropped",
    "x_causal_lm_loss_sum__mutmut_21": (
        "equivalent in value: without chunk=chunk dense_loss reads the whole vocab at once (chunk 0): the same loss "
        "and gradient, only larger fp32 temporaries"
    ),
    "x_model_inputs__mutmut_31": _CPU,
    "x_model_inputs__mutmut_33": _CPU,
    "x_model_inputs__mutmut_34": "equivalent in value: a blocking host-to-device copy of the lengths (speed only)",
    "x_model_inputs__mutmut_39": "equivalent in value: a blocking host-to-device copy of the lengths (speed only)",
    "x_block_diagonal_mask__mutmut_23": (
        "equivalent on CPU (the default device); on a GPU the mask would be built on the host and the "
        "masked_fill with a device mask fails at once (the GPU tests catch it)"
    ),
    "x_block_diagonal_mask__mutmut_10": _CPU,
    "x_block_diagonal_mask__mutmut_14": _CPU,
    "x_block_diagonal_mask__mutmut_29": _CPU,
    "x_collate__mutmut_13": "equivalent: torch.full with an integer fill value makes int64 already",
    "x_collate__mutmut_16": "equivalent: torch.full with an integer fill value makes int64 already",
    "x_collate__mutmut_22": "equivalent: torch.full with an integer fill value makes int64 already",
    "x_collate__mutmut_25": "equivalent: torch.full with an integer fill value makes int64 already",
    "x_collate_packed__mutmut_6": "equivalent: torch.full with an integer fill value makes int64 already",
    "x_collate_packed__mutmut_9": "equivalent: torch.full with an integer fill value makes int64 already",
    "x_collate_packed__mutmut_18": (
        "equivalent: the padding positions' position_ids are overwritten by arange right after, "
        "so the fill value is never read"
    ),
    "x_preference_losses__mutmut_15": (
        "equivalent: the integer count divides a float tensor, which gives the same float quotient"
    ),
    "x_apply_lora__mutmut_8": (
        "equivalent: the default is read only for a model without the 4-bit flag, and None is as false as False"
    ),
    "x_apply_lora__mutmut_46": "equivalent: bias='none' is peft's default",
    "x_export_lora__mutmut_11": "equivalent: torch's load_state_dict only tests `if strict`, and None is false",
    "x_export_lora__mutmut_17": _TF5_SAFE,
    "x_export_lora__mutmut_19": _TF5_SAFE,
    "x_export_lora__mutmut_21": _TF5_SAFE,
    "x_export_lora__mutmut_25": "equivalent: safe_serialization=True is peft's default",
    "x_apply_lora__mutmut_27": "equivalent: peft lower-cases the 'all-linear' shorthand before comparing",
    "x_shuffle_buffer_order__mutmut_2": (
        "equivalent: a buffer of one slot (or a stream of one) emits the stream in order either way"
    ),
    "x_shuffle_buffer_order__mutmut_3": ("equivalent: a buffer of one slot emits the stream in order either way"),
    "x_shuffle_buffer_order__mutmut_5": "equivalent: a stream of one record comes out as itself either way",
    "xǁRecordDatasetǁadvance__mutmut_6": (
        "equivalent: at exactly one epoch, divmod gives (1, 0), which the epoch-end rule turns back into (0, per)"
    ),
    "x_shuffle_buffer_order__mutmut_17": "equivalent: integers(b) is integers(0, b)",
    "x_shuffle_buffer_order__mutmut_38": "equivalent: the values are cast to the stream's dtype when assigned to out",
    "x_shuffle_buffer_order__mutmut_40": "equivalent: the values are cast to the stream's dtype when assigned to out",
    "xǁRecordDatasetǁepoch_order__mutmut_27": "equivalent: the empty stream is cast to int64 right after",
    "xǁRecordDatasetǁepoch_order__mutmut_29": "equivalent: the empty stream is cast to int64 right after",
    "xǁRecordDatasetǁepoch_order__mutmut_41": "equivalent in value: without the cache the same order is recomputed",
    **{
        f"x_token_logps__mutmut_{i}": "equivalent: on these 2-D tensors (1-D for unsqueeze) dim +1 is dim -1"
        for i in (31, 39, 42, 44, 54, 58, 60, 66, 70, 74)
    },
    "x_log1mexp__mutmut_7": "equivalent: at x = -log 2 exactly both branches give log(1/2)",
    "x_log1mexp__mutmut_9": (
        "equivalent within float64 rounding: between -1.69 and -0.69 both formulas are accurate (1 - e^x >= 0.5)"
    ),
    "x_preference_losses__mutmut_11": (
        "equivalent: the integer count divides a float tensor, which gives the same float quotient"
    ),
    "x_f1__mutmut_15": "equivalent: when p or r is 0 (and not both), 2pr/(p+r) is 0 as well",
    "x_pass_at_k__mutmut_3": (
        "equivalent: the early return is a shortcut; when n - c < k the product has the factor 1 - k/k = 0"
    ),
    # kd
    "x__chunks__mutmut_3": _CHUNK,
    "x__chunks__mutmut_5": _CHUNK,
    "x_dense_loss__mutmut_4": _CHUNK,
    "x_sparse_loss__mutmut_3": _CHUNK,
    "x_top_k_targets__mutmut_2": _CHUNK,
    "x__bucket_kd__mutmut_1": "equivalent: every caller passes beta",
    "xǁ_DenseLossǁforward__mutmut_1": "equivalent: dense_loss always passes beta",
    "x__ids_mask__mutmut_15": "equivalent: an id at local column w is sent to the spare column w either way",
    "x__ids_mask__mutmut_24": _CPU,
    "x__ids_mask__mutmut_28": _CPU,
    "x__ids_mask__mutmut_31": "equivalent: the mask is cut to its first w columns; a second spare column is never read",
    "x__lse_chunked__mutmut_4": (
        "equivalent: the fp32 start values are promoted to the logits' dtype by the first chunk's maximum"
    ),
    "x__lse_chunked__mutmut_8": (
        "equivalent: the fp32 start values are promoted to the logits' dtype by the first chunk's maximum"
    ),
    "x__lse_chunked__mutmut_13": "equivalent: a two-element slice has the same dtype as a one-element one",
    "x__lse_chunked__mutmut_14": "equivalent: a two-element slice has the same dtype as a one-element one",
    "x__lse_chunked__mutmut_5": _CPU,
    "x__lse_chunked__mutmut_9": _CPU,
    "x_dense_loss__mutmut_40": _BOOL_MASK,
    "x_sparse_loss__mutmut_161": _BOOL_MASK,
    **{f"x_kd_reference__mutmut_{i}": _DIM1 for i in (20, 28, 38, 47, 56, 70, 78)},
    "x_sparse_loss__mutmut_88": _DIM1,
    "x_sparse_loss__mutmut_90": _DIM1,
    "x_top_k_targets__mutmut_13": _DIM1,
    "x_sparse_loss__mutmut_20": "equivalent: only a temperature exactly 1e-6 from the cache's differs",
    "x_sparse_loss__mutmut_58": (
        "equivalent: the product with the fp32 (fp64 in gradcheck) log-probs promotes to the same dtype and values"
    ),
    "x_sparse_loss__mutmut_60": (
        "equivalent: the difference with the fp32 (fp64 in gradcheck) log-probs promotes to the same dtype and values"
    ),
    "x_sparse_loss__mutmut_129": (
        "harmless: differs only for a stored rest mass of exactly 1 (the teacher's k tokens hold no mass), where "
        "the k tokens get probability 0 instead of 1e-7 times their softmax"
    ),
    "x_sparse_loss__mutmut_130": (
        "harmless: differs only for a stored rest mass of exactly 1 (the teacher's k tokens hold no mass), where "
        "the k tokens get probability 0 instead of 1e-7 times their softmax"
    ),
    "x_top_k_targets__mutmut_46": (
        "equivalent: lse_top - lse_all is <= 0 up to rounding, and a rounding-positive value gives a negative "
        "rest that the final clamp(min=0) turns into 0, as clamp(max=0) would"
    ),
    **{f"xǁ_DenseLossǁ{f}__mutmut_{i}": _BETA_EDGE for f in ("forward", "backward") for i in (9, 16)},
    "xǁ_DenseLossǁbackward__mutmut_21": _NEVER_NONE,
    "xǁ_DenseLossǁbackward__mutmut_24": _NEVER_NONE,
    "xǁ_LogitStatsǁbackward__mutmut_6": _NEVER_NONE,
    "xǁ_LogitStatsǁbackward__mutmut_11": _NEVER_NONE,
    "xǁ_LogitStatsǁbackward__mutmut_16": _NEVER_NONE,
    "xǁ_DenseLossǁbackward__mutmut_22": _SAME_DTYPE,
    "xǁ_DenseLossǁbackward__mutmut_30": _SAME_DTYPE,
    "xǁ_LogitStatsǁbackward__mutmut_9": _SAME_DTYPE,
    "xǁ_LogitStatsǁbackward__mutmut_14": _SAME_DTYPE,
    "xǁ_LogitStatsǁbackward__mutmut_27": _SAME_DTYPE,
    "xǁ_DenseLossǁbackward__mutmut_43": _CAST,
    "xǁ_DenseLossǁbackward__mutmut_92": _CAST,
    "xǁ_LogitStatsǁbackward__mutmut_102": _CAST,
    "xǁ_DenseLossǁbackward__mutmut_85": "equivalent in value: at T = 1 it recomputes the softmax q it already has",
    "xǁ_DenseLossǁforward__mutmut_38": _S1_AT_T1,
    "xǁ_DenseLossǁforward__mutmut_43": _S1_AT_T1 + "; without a teacher the extra one is never filled or read",
    "xǁ_LogitStatsǁforward__mutmut_25": _S1_AT_T1,
    **{f"xǁ_LogitStatsǁbackward__mutmut_{i}": _REST_NAN for i in (20, 21, 22, 24, 25, 26, 28, 29, 30)},
    "xǁ_LogitStatsǁbackward__mutmut_58": (
        "equivalent: at T = 1 the Function returns one tensor as both lse1 and lseT, and autograd hands its whole "
        "gradient to the later output (g_lse1 arrives as zeros), so the sign of the g_lse1 term is never seen"
    ),
    # prune slicing
    "x__idx__mutmut_2": "equivalent: torch.tensor of Python ints is int64 already (the index lists are never empty)",
    "x__idx__mutmut_5": "equivalent: torch.tensor of Python ints is int64 already (the index lists are never empty)",
    "x__idx__mutmut_3": _CPU,
    "x__idx__mutmut_6": _CPU,
    "x__top__mutmut_1": "equivalent: at k = n the sorted path returns every index in order too",
    "x_choose_layers__mutmut_1": "equivalent: choose_layers treats every value but 'drop_last' as block influence",
    "x_choose_layers__mutmut_2": "equivalent: choose_layers treats every value but 'drop_last' as block influence",
    "x_make_plan__mutmut_1": "equivalent: choose_layers treats every value but 'drop_last' as block influence",
    "x_make_plan__mutmut_2": "equivalent: choose_layers treats every value but 'drop_last' as block influence",
    "x_mean__mutmut_7": _NAN,
    "x_stderr__mutmut_6": _NAN,
    "x_pooled_stderr__mutmut_16": _NAN,
    "x_unweighted_stderr__mutmut_12": _NAN,
}

STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    36: "timeout",
    -24: "timeout",
    24: "timeout",
    152: "timeout",
    255: "timeout",
    None: "not checked",
}


def mangled(module: str, function: str) -> str:
    """mutmut's name prefix of the mutants of ``function`` (``Class.method`` or a plain function)."""
    if "." in function:
        cls, meth = function.split(".")
        return f"{module}.xǁ{cls}ǁ{meth}__mutmut_"
    return f"{module}.x_{function}__mutmut_"


def scratch_copy(dest: Path) -> None:
    """The package, the tests and the project files, without caches or build outputs."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "mutants")
    for d in ("minima", "tests"):
        shutil.copytree(ROOT / d, dest / d, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")


def _spread(names: list[str], n: int) -> list[str]:
    """``n`` names evenly spaced over the list (deterministic)."""
    step = len(names) / n
    return [names[int(i * step)] for i in range(n)]


def run_target(name: str, t: Target, work: Path, env: dict, sample: int = 0) -> dict:
    """Run mutmut over one target in its own scratch copy; return counts and survivor diffs."""
    d = work / name.replace(" ", "_")
    scratch_copy(d)
    module = t.file[:-3].replace("/", ".")
    lines = [
        "[mutmut]",
        "source_paths=minima",
        f"only_mutate={t.file}",
        "pytest_add_cli_args_test_selection=",
        *[f"    {x}" for x in t.tests],
        "pytest_add_cli_args=",
        "    -p",
        "    no:cacheprovider",
        "process_isolation=fork",
        "use_git_change_detection=false",
        "",
    ]
    (d / "setup.cfg").write_text("\n".join(lines))
    prefixes = tuple(mangled(module, f) for f in t.functions)
    meta = d / "mutants" / (t.file + ".meta")
    t0 = time.time()
    names = [p + "*" for p in prefixes]
    if sample:
        # Generate the mutants and the test map only (a pattern that matches no mutant), then run an
        # evenly spaced sample of each function's mutants.
        subprocess.run(
            [str(MUTMUT), "run", "--max-children", "1", "no_such_mutant__mutmut_*"],
            cwd=d,
            env=env,
            capture_output=True,
            text=True,
        )
        if not meta.exists():
            raise RuntimeError(f"mutmut generated no mutants for {name}")
        every = sorted(k for k in json.loads(meta.read_text())["exit_code_by_key"] if k.startswith(prefixes))
        names = _spread(every, sample) if len(every) > sample else every
    proc = subprocess.run(
        [str(MUTMUT), "run", "--max-children", "1", *names],
        cwd=d,
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.time() - t0
    if not meta.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"mutmut produced no results for {name} (exit {proc.returncode}):\n{tail}")
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    chosen = set(names) if sample else None
    mine = {k: v for k, v in codes.items() if k.startswith(prefixes) and (chosen is None or k in chosen)}
    by_status: dict[str, list[str]] = {}
    for k, v in sorted(mine.items()):
        by_status.setdefault(STATUS.get(v, "suspicious"), []).append(k)
    survivors = by_status.get("survived", []) + by_status.get("no tests", [])
    diffs = {}
    for k in survivors:
        shown = subprocess.run([str(MUTMUT), "show", k], cwd=d, env=env, capture_output=True, text=True)
        diffs[k] = "\n".join(
            x for x in shown.stdout.splitlines() if x.startswith(("+", "-")) and x[:3] not in ("+++", "---")
        )
    killed = len(by_status.get("killed", [])) + len(by_status.get("timeout", []))
    total = len(mine)
    return {
        "file": t.file,
        "total": total,
        "killed": killed,
        "by_status": {k: len(v) for k, v in by_status.items()},
        "survivors": diffs,
        "seconds": elapsed,
        "sampled": bool(sample),
        "tests": t.tests,
    }


_QUOTED = re.compile(r"""(f?"[^"]*"|f?'[^']*')""")
_MESSAGE_LINE = re.compile(r"""^\s*(raise \w+\(|(fix|where)=)""")


def message_only(diff: str) -> bool:
    """True for a mutant that changes only the text inside the quotes of an error message or its fix hint:
    one removed and one added line, the removed line a ``raise X(...)`` or a ``fix=``/``where=`` argument,
    and the two lines equal once every quoted string is blanked out."""
    minus = [x[1:] for x in diff.splitlines() if x.startswith("-")]
    plus = [x[1:] for x in diff.splitlines() if x.startswith("+")]
    if len(minus) != 1 or len(plus) != 1 or not _MESSAGE_LINE.match(minus[0]):
        return False
    return _QUOTED.sub('""', minus[0]) == _QUOTED.sub('""', plus[0])


# Survivors explained by the line they change: (function name prefix, text of the removed line, reason).
EXPLAINED_LINES = [
    (
        "x_tokenize_texts__",
        "backend = getattr(tokenizer",
        "equivalent in value: it only turns the Rust fast path off (or on for a tokenizer that has it), and the "
        "fallback tokenizer(texts, add_special_tokens=False) gives the same ids (tests/test_formats.py); speed only",
    ),
    (
        "x_tokenize_texts__",
        'if backend is not None and hasattr(backend, "encode_batch_fast")',
        "equivalent in value: it only turns the Rust fast path off, and the fallback gives the same ids; speed only",
    ),
]


def reason(key: str, diff: str) -> str | None:
    """Why a survivor is equivalent or harmless, or None when it is a gap in the tests."""
    name = key.split(".")[-1]
    if name in EXPLAINED:
        return EXPLAINED[name]
    removed = " ".join(x[1:] for x in diff.splitlines() if x.startswith("-"))
    added = " ".join(x[1:] for x in diff.splitlines() if x.startswith("+"))
    if "_text(" in removed and _QUOTED.sub('""', removed) == _QUOTED.sub('""', added).replace("None", '""'):
        return "harmless: changes only the field name that _text quotes in its error message"
    for prefix, line, why in EXPLAINED_LINES:
        if name.startswith(prefix) and line in removed:
            return why
    if message_only(diff):
        return "harmless: changes only the wording of an error message or its fix hint (no number, no behaviour)"
    return None


def previous_parts(section: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The table row and the survivor entries of each target in an earlier mutation section."""
    rows: dict[str, str] = {}
    survivors: dict[str, list[str]] = {}
    head, _, tail = section.partition("### Surviving mutants")
    for line in head.splitlines():
        name = line.strip().strip("|").split("|")[0].strip()
        if line.startswith("| ") and name in TARGETS:
            rows[name] = line
    for entry in re.split(r"\n(?=- )", tail.strip()):
        m = re.match(r"- (.+?): `", entry)
        if m and m.group(1) in TARGETS:
            survivors.setdefault(m.group(1), []).append(entry.strip())
    return rows, survivors


def current_section() -> str:
    """The mutation section now in RESULTS.md ('' when there is none)."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    m = re.search(r"<!-- BEGIN mutation -->(.*?)<!-- END mutation -->", text, re.S)
    return m.group(1) if m else ""


def render(results: dict, previous: str = "") -> str:
    """The section for ``results``; targets that were not run keep their row and survivors from ``previous``."""
    old_rows, old_survivors = previous_parts(previous)
    rows = [
        "| target | file | mutants | killed | survived | score | score without the named equivalents "
        "| tests given | minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    entries: list[str] = []
    for name in TARGETS:
        if name not in results:
            if name in old_rows:
                rows.append(old_rows[name])
                entries += old_survivors.get(name, [])
            continue
        r = results[name]
        score = r["killed"] / r["total"] if r["total"] else float("nan")
        surv = len(r["survivors"])
        named = sum(reason(k, d) is not None for k, d in r["survivors"].items())
        adjusted = r["killed"] / (r["total"] - named) if r["total"] > named else float("nan")
        rows.append(
            f"| {name} | `{r['file']}` | {r['total']}{' (sample)' if r.get('sampled') else ''} | {r['killed']} | "
            f"{surv} | **{score:.0%}** | {adjusted:.0%} | "
            f"{len(r['tests'])} | {r['seconds'] / 60:.1f} |"
        )
        for k, diff in r["survivors"].items():
            why = reason(k, diff) or "**not explained: a gap in the tests**"
            lines = [f"- {name}: `{k.split('.')[-1]}`: {why}", "", "  ```diff"]
            entries.append("\n".join([*lines, *[f"  {x}" for x in diff.splitlines()], "  ```"]))
    out = [
        "## mutation score (`python benchmarks/mutation.py`)",
        "",
        f"mutmut, one mutant at a time, only the functions that compute numbers, each mutant against the tests "
        f"that call its function (from the per-target list in the script); {machine()}. "
        "Killed includes timeouts. Goal: >= 85% per target. A target marked (sample) ran an evenly spread "
        "sample of its mutants (`--sample 30`, to fit a shared 2-core machine), so its score is an estimate "
        "(one binomial standard error is about 7 points at 30 mutants); a full run is `--sample 0`. The last "
        "score column leaves out the survivors named below as equivalent or not testable on CPU. "
        "`--only` reruns some targets and keeps the other targets' rows and survivors from the previous section.",
        "",
        *rows,
        "",
        *[f"- {n}: {NOTES[n]}" for n in TARGETS if n in NOTES and (n in results or n in old_rows)],
        "",
        "### Surviving mutants",
    ]
    for e in entries:
        out += ["", e]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="target names (default: all)")
    ap.add_argument("--work", help="scratch directory (default: a temporary one, removed at the end)")
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--sample", type=int, default=0, help="run only this many mutants per target, evenly spread")
    ap.add_argument("--no-write", action="store_true", help="print, don't update RESULTS.md")
    ap.add_argument("--from-json", nargs="*", help="render these saved results (one run per target) instead of running")
    args = ap.parse_args()
    if args.from_json:
        results = {}
        for f in args.from_json:
            results.update(json.loads(Path(f).read_text()))
        results = {n: results[n] for n in TARGETS if n in results}
        md = render(results, current_section())
        print(md)
        if not args.no_write:
            write_section("mutation", md)
        return
    names = args.only or list(TARGETS)
    env = dict(os.environ, OMP_NUM_THREADS="1", MINIMA_SHARED_DATA=str(ROOT.parent / "shared" / "data"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="minima-mutation-"))
    results = {}
    try:
        for n in names:
            print(f"[mutation] {n} ...", flush=True)
            results[n] = run_target(n, TARGETS[n], work, env, args.sample)
            r = results[n]
            print(f"[mutation] {n}: {r['killed']}/{r['total']} killed, {r['by_status']}", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    md = render(results, current_section())
    print(md)
    if not args.no_write:
        write_section("mutation", md)


if __name__ == "__main__":
    main()
