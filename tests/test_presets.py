"""The minima-3b and minichat-3b presets reproduce MiniMA's and MiniChat's scripts: the test reads the
scripts' flags from the recipe (../shared/recipes/minima-minichat-tutorial.md) and compares each with the
preset value it maps to, and checks that README's "Coming from MiniMA's scripts" table names every flag."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT

from minima.core.presets import get_preset

RECIPE = ROOT.parent / "shared" / "recipes" / "minima-minichat-tutorial.md"

# script -> (preset, pipeline part, GPUs the recipe names for it)
SCRIPTS = {
    "expand_vocab.sh": ("minima-3b", "vocab", None),
    "build_pretraining_data.sh": ("minima-3b", "records_lm", None),
    "adapt_llama.sh": ("minima-3b", "adapt", 32),
    "prune_llama.sh": ("minima-3b", "prune", 1),
    "convert_llama.sh": ("minima-3b", "prune", None),
    "distil_minima.sh": ("minima-3b", "distill", 16),
    "build_instruction_data.sh": ("minichat-3b", "records_chat", None),
    "instrcut_minichat.sh": ("minichat-3b", "sft", 8),
    "instrcut_minichat_lora.sh": ("minichat-3b", "sft", 8),
}
TRUE = object()  # a flag without a value


def _bool(key, want=True):
    return lambda cfg, v: getattr(cfg, key) is want


# flag -> check(stage config, script value); None: a path, a launcher variable or a naming flag (no preset value)
FLAGS = {
    "max_seq_length": lambda c, v: c.max_length == int(v),
    "num_processors": lambda c, v: c.num_workers == int(v),
    "do_lower_case": lambda c, v: c.lowercase is False,  # left off on purpose (see the preset's comment)
    "max_length": lambda c, v: c.max_length == int(v) if hasattr(c, "max_length") else True,
    "per_device_train_batch_size": lambda c, v: c.micro_batch_size == int(v),
    "num_grad_accum_steps": lambda c, v: c.gradient_accumulation_steps == int(v),
    "per_device_eval_batch_size": lambda c, v: (
        getattr(c, "batch_size", None) == int(v) if hasattr(c, "batch_size") else True
    ),
    "learning_rate": lambda c, v: c.lr == float(v),
    "weight_decay": lambda c, v: c.weight_decay == float(v),
    "num_train_epochs": lambda c, v: c.epochs == float(v),
    "num_patience_epochs": lambda c, v: c.patience == int(v) and c.eval_per_epoch is True,
    "lr_scheduler_type": lambda c, v: c.lr_schedule == v,
    "warmup_proportion": lambda c, v: c.warmup_proportion == float(v),
    "max_grad_norm": lambda c, v: c.grad_clip == float(v),
    "seed": lambda c, v: c.seed == int(v),
    "use_act_ckpt": _bool("activation_checkpointing"),
    "use_bf16": lambda c, v: c.precision == "bf16",
    "layer": lambda c, v: c.num_layers == int(v),
    "hidden": lambda c, v: c.hidden_size == int(v),
    "head": lambda c, v: c.num_heads == int(v),
    "intermediate": lambda c, v: c.intermediate_size == int(v),
    "nproc_per_node": None,
    "nnodes": None,
    "node_rank": None,
    "master_addr": None,
    "master_port": None,
    "model_type": None,
    "data_type": None,
    "model_suffix": None,
    "resume": None,  # minima always resumes from the newest complete checkpoint
    "deepspeed": None,  # ds_config.json, the default
    "log_interval": None,
    "output_dir": None,
    "input_dir": None,
    "input_regex": None,
    "tokenizer_name_or_path": None,
    "llama_tokenizer_dir": None,
    "chinese_sp_path": None,
    "model_name_or_path": None,
    "teacher_model_name_or_path": None,
    "student_model_name_or_path": None,
    "record_path_or_regex": None,
    "sparsellama_dir": None,  # prune writes the 3B model directly (no sparse checkpoint to convert)
    "train_record_path_or_regex": None,
    "dev_record_path_or_regex": None,
}


def script_flags() -> dict[str, dict[str, object]]:
    """script name -> {flag: value or TRUE}, from the recipe's fenced bash blocks."""
    if not RECIPE.exists():
        pytest.skip(f"recipe not available: {RECIPE} (../shared is absent in a user's fresh clone)")
    text = RECIPE.read_text()
    out = {}
    for m in re.finditer(r"`scripts/([\w.]+\.sh)`", text):
        block = re.search(r"```bash\n(.*?)```", text[m.end() :], re.S)
        name, body = m.group(1), block.group(1).replace("\\\n", " ")
        flags: dict[str, object] = {}
        toks = body.split()
        for i, t in enumerate(toks):
            if t.startswith("--"):
                key, _, val = t[2:].partition("=")
                nxt = toks[i + 1] if i + 1 < len(toks) else "--"
                flags[key] = val or (TRUE if nxt.startswith("--") else nxt)
        out[name] = flags
    return out


def test_recipe_scripts_are_all_parsed():
    flags = script_flags()
    assert set(SCRIPTS) <= set(flags), sorted(flags)
    assert flags["instrcut_minichat.sh"]["num_patience_epochs"] == "2"
    assert flags["distil_minima.sh"]["per_device_train_batch_size"] == "8"


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_preset_matches_the_script(script):
    flags = script_flags()[script]
    preset, part, gpus = SCRIPTS[script]
    pipe = get_preset(preset)
    cfg = getattr(pipe, part)
    unknown = sorted(set(flags) - set(FLAGS))
    assert not unknown, f"{script}: flags without a mapping: {unknown}"
    for flag, value in flags.items():
        check = FLAGS[flag]
        if check is None:
            continue
        target = pipe.prune if flag in ("layer", "hidden", "head", "intermediate") else cfg
        if script.endswith("_lora.sh") and flag == "use_act_ckpt":
            continue
        assert check(target, None if value is TRUE else value), f"{script}: --{flag} {value} vs preset {preset}.{part}"
    if gpus and "per_device_train_batch_size" in flags:
        script_global = int(flags["per_device_train_batch_size"]) * int(flags["num_grad_accum_steps"]) * gpus
        assert cfg.micro_batch_size * cfg.gradient_accumulation_steps * gpus == script_global


def test_minichat_global_batch_and_patience_fire():
    sft = get_preset("minichat-3b").sft
    assert sft.micro_batch_size * sft.gradient_accumulation_steps * 8 == 256
    assert sft.patience == 2 and sft.eval_per_epoch  # patience counts epochs, and evaluations happen per epoch
    assert get_preset("minima-3b").distill.micro_batch_size == 8


def test_readme_table_names_every_script_flag():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Coming from MiniMA's scripts", 1)
    assert len(section) == 2, "README has no 'Coming from MiniMA's scripts' section"
    table = section[1].split("\n## ", 1)[0]
    missing = sorted({f for fl in script_flags().values() for f in fl if f"--{f}" not in table})
    assert not missing, f"README table lacks {missing}"
