"""README.md is true: its evaluate example runs on the bundled data, its speed ratios come from
benchmarks/RESULTS.md, and every fenced shell command is run by a test or says why it can't run in CI."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import ROOT, shared

from minima.cli import main


def test_readme_evaluate_example_runs_on_bundled_data(tmp_path, tiny_model_dir, monkeypatch):
    """`minima evaluate model=... tasks=[mmlu,ceval,cmmlu,gsm8k] limit=50` (README, scripts/09_evaluate.sh)
    on ../shared/data/eval: CMMLU ships only dev, so its items get 4 shots from the other dev items."""
    shared("eval/cmmlu")
    monkeypatch.chdir(ROOT)  # data_dir defaults to ../shared/data/eval, relative to the repo root
    out = tmp_path / "eval"
    argv = ["evaluate", f"model={tiny_model_dir}", "tasks=[mmlu,ceval,cmmlu,gsm8k]", "limit=1"]
    assert main([*argv, "max_new_tokens=8", f"out_dir={out}"]) == 0
    res = json.loads((out / "results.json").read_text())
    text = json.dumps(res)
    for name in ("mmlu", "ceval", "cmmlu", "gsm8k"):
        assert f'"{name}"' in text
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    per_task = {t: sum(s["task"] == t for s in samples) for t in ("mmlu", "ceval", "cmmlu", "gsm8k")}
    assert per_task == {"mmlu": 57, "ceval": 52, "cmmlu": 67, "gsm8k": 1}
    (scores,) = [m["tasks"] for m in res["models"].values()]
    # the shots CMMLU's items really got (its pool is the dev split less the item)
    assert set(scores["cmmlu"]["info"]["fewshot_short"].values()) == {4}
    assert "fewshot_short" not in scores["mmlu"]["info"] and scores["mmlu"]["info"]["fewshot_split"] == "dev"


# ------------------------------------------------------------------------------ scripts/0N_*.sh
# The training scripts (03_adapt, 05_distil, 07_instruct, 08_instruct_lora) are not run here: each launches a
# DeepSpeed job; their stages run at tiny scale in tests/test_adapt.py, test_distill.py, test_sft.py, test_lora.py.
CHEAP_SCRIPTS = ("01_expand_vocab", "02_build_pretraining_data", "04_prune", "06_build_instruction_data", "09_evaluate")


def _script(name: str, env: dict, *args: str, tmp: Path) -> None:
    import os
    import subprocess
    import sys

    wrapper = tmp / "minima"
    if not wrapper.exists():  # this checkout's minima, whatever .venv/bin/minima points at
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m minima.cli "$@"\n')
        wrapper.chmod(0o755)
    full = {**os.environ, "PYTHONPATH": str(ROOT), "MINIMA": str(wrapper), "PRESET": "tiny", **env}
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / f"{name}.sh"), *args], env=full, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, f"{name}.sh failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"


def test_cheap_scripts_run_at_tiny_scale(tmp_path, demo_data_dir, tiny_model_dir):
    """01 vocab -> 02 records -> 04 prune, 06 chat records, 09 evaluate (README's task list) with PRESET=tiny."""
    t, demo = tmp_path, demo_data_dir
    _script(
        "01_expand_vocab",
        {
            "BASE_TOKENIZER": str(demo / "tokenizers/base_en.model"),
            "EXTRA_SP": str(demo / "tokenizers/extra_zh.model"),
            "BASE_MODEL": str(tiny_model_dir),
            "OUT": str(t / "01_vocab"),
        },
        tmp=t,
    )
    _script(
        "02_build_pretraining_data",
        {"INPUTS": str(demo / "text/*.txt"), "TOKENIZER": str(t / "01_vocab"), "OUT": str(t / "02_records_lm")},
        tmp=t,
    )
    _script(
        "04_prune",
        {"TEACHER": str(t / "01_vocab"), "RECORDS": str(t / "02_records_lm")},
        f"out_dir={t / '04_prune'}",
        "num_samples=8",
        tmp=t,
    )
    _script(
        "06_build_instruction_data",
        {"INPUTS": str(demo / "chat/demo_chat.json"), "TOKENIZER": str(t / "01_vocab"), "OUT": str(t / "02_chat")},
        tmp=t,
    )
    for d in ("01_vocab", "02_records_lm", "04_prune", "02_chat"):
        assert (t / d / "manifest.json").is_file(), d  # complete artifacts
    prune = json.loads((t / "04_prune" / "config.json").read_text())
    assert prune["num_hidden_layers"] == 3 and prune["hidden_size"] == 96  # the tiny preset's student shape
    if (ROOT.parent / "shared" / "data" / "eval" / "cmmlu").is_dir():
        _script(
            "09_evaluate", {"MODEL": str(t / "04_prune")}, "limit=1", "max_new_tokens=8", f"out_dir={t / '09'}", tmp=t
        )
        samples = (t / "09" / "samples.jsonl").read_text().splitlines()
        assert {json.loads(s)["task"] for s in samples} == {"mmlu", "ceval", "cmmlu", "gsm8k"}


# ------------------------------------------------------------------------------ claims and commands
def test_readme_speed_ratios_come_from_results():
    """Every `N.Nx` ratio README.md states is one benchmarks/RESULTS.md measured."""
    import re

    readme, results = (ROOT / "README.md").read_text(), (ROOT / "benchmarks" / "RESULTS.md").read_text()
    ratios = set(re.findall(r"(?<![\w.])(\d+\.\d+)x\b", readme))
    assert ratios, "README states no ratio: drop this test or the regex is wrong"
    measured = set(re.findall(r"(?<![\w.])(\d+\.\d+)x\b", results))
    assert not ratios - measured, f"README ratios not in benchmarks/RESULTS.md: {sorted(ratios - measured)}"


# README command (whitespace collapsed, without its comment) -> the tests that run it, its stage and options, at
# tiny scale on bundled data. A command not listed must say beside it why it can't run in CI ("not in CI: ...").
README_COMMANDS = {
    "minima prune teacher=... records=... target_params=3.0e9 dry_run=true": (
        "test_prune_search.py::test_dry_run_lists_7b_candidates_at_multiples_of_128"
    ),
    "minima prune teacher=... records=... target_params=3.0e9 search.top_k=3 search.retrain_steps=20 "
    "[search.tolerance=0.01 search.multiple=128 search.min_ratio=0.5 search.logit_cache=runs/x/05_distill_cache]": (
        "test_prune_search.py::test_stage_writes_search_json_and_the_chosen_shape",
        "test_prune_search.py::test_retraining_from_a_full_vocab_logit_cache_equals_retraining_against_the_teacher",
    ),
    "minima evaluate model=M tasks=[alpaca_eval] tasks.alpaca_eval.path=F answers_only=true out_dir=runs/x/ans": (
        "test_evaluate_answers_only.py::test_answers_only_then_judge_equals_the_one_shot_run"
    ),
    "minima evaluate judge answers=runs/x/ans chat_mode=pairwise judge_base_url=URL judge_model=NAME": (
        "test_evaluate_answers_only.py::test_answers_only_then_judge_equals_the_one_shot_run"
    ),
    "bash scripts/demo.sh": "test_pipeline_e2e.py::test_every_artifact_exists_and_loads",
    "bash scripts/test.sh": "CI",  # what CI runs: this suite
    "minima vocab base_tokenizer=llama/tokenizer.model extra_sp_model=chinese_sp.model mode=minima "
    "out_dir=runs/x/01_vocab [base_model=Llama-2-7b-hf embedding_init=mean|normal|mean-of-subtokens]": (
        "test_vocab.py::test_real_minima_49216_and_english_unchanged",
        "test_vocab.py::test_demo_resized_model",
    ),
    "minima records inputs='data/*.jsonl' tokenizer=runs/x/01_vocab out_dir=runs/x/02_records_lm max_length=2048 "
    "num_workers=8": "test_records.py::test_cli_builds_records",
    "minima records format=chat chat_format=minichat inputs=sharegpt.json tokenizer=... on_error=skip": (
        "test_faults.py::test_case10_skipped_records_tiny_dev_split_chat_records_in_distill_and_corrupt_tokenizer"
    ),
    "minima records format=preference inputs=pairs.jsonl tokenizer=runs/x/06_sft": (
        "test_dpo.py::test_three_shapes_give_sft_ids_and_counts"
    ),
    "minima records format=chat chat_format=mc tokenizer=runs/x/01_vocab out_dir=runs/x/02_records_mix "
    "inputs='[{name: arc, path: ../shared/data/eval/arc/*.jsonl, size: all}, {name: mmlu, path: "
    "../shared/data/eval/mmlu/dev, size: 10%}, {name: gsm8k, path: ../shared/data/eval/gsm8k/train_first1000.jsonl, "
    "size: 200}, {name: winogrande, path: ../shared/data/eval/winogrande, size: 100}]'": (
        "test_records_loaders.py::test_readme_mixing_and_columns_examples_run"
    ),
    "minima records format=chat chat_format=alpaca tokenizer=runs/x/01_vocab out_dir=runs/x/02_records_dolly "
    "inputs='[{name: dolly151, path: ../shared/data/instruction/dolly_alpaca_prompt_151.jsonl, columns: {prompt: "
    "prompt, response: answer}}]'": "test_records_loaders.py::test_readme_mixing_and_columns_examples_run",
    "minima analyze records=runs/x/02_records_mix [model=runs/x/06_sft]": (
        "test_records_loaders.py::test_readme_mixing_and_columns_examples_run"
    ),
    "minima adapt --preset tiny model=runs/x/01_vocab records=runs/x/02_records_lm out_dir=runs/x/03_adapt "
    "max_steps=30": "test_adapt.py::test_acceptance_outputs",
    "minima adapt ... launch.nproc_per_node=8": "test_train_launch.py::test_two_processes_match_one",
    "minima adapt ... launch.nnodes=2 launch.node_rank=R launch.master_addr=H": (
        "test_train_launch.py::test_two_nodes_on_loopback_match_two_processes"
    ),
    "minima adapt ... train_only_new_embeddings=true": "test_adapt.py::test_train_only_new_embeddings",
    "minima adapt ... eval_tasks=[mmlu,gsm8k] eval_shots='{mmlu: 5, gsm8k: 8}' eval_steps=500": (
        "test_evaluate_training.py::test_adapt_logs_benchmark_scores_at_each_eval",
        "test_eval_shots.py::test_callback_runs_each_task_with_its_shots",
    ),
    "minima prune --preset minima-3b dry_run=true": "test_prune.py::test_dry_run_minima_3b_on_meta_gives_3_02b",
    "minima prune teacher=runs/x/03_adapt records=runs/x/02_records_lm num_layers=24 num_heads=24 hidden_size=3072 "
    "intermediate_size=8192 importance=activation|gradient|magnitude|random keep_layers=[4,...,27] | "
    "layer_importance=block-influence|drop_last": (
        "test_prune.py::test_stage_writes_a_plain_llama_that_reloads_and_generates"
    ),
    "minima distill --preset minima-3b teacher=runs/x/03_adapt student=runs/x/04_prune records=runs/x/02_records_lm": (
        "test_distill.py::test_cli_cache_then_train_from_it",
        "test_distill.py::test_minima_3b_preset_is_minimas_recipe",
    ),
    "minima distill-cache <same args> cache_top_k=64 [cache_mode=sampled]": (
        "test_distill.py::test_cli_cache_then_train_from_it",
        "test_distill.py::test_sampled_cache_estimates_the_online_kd",
    ),
    "minima distill <same args> cache_logits=true": "test_distill.py::test_cli_cache_then_train_from_it",
    "minima sft model=runs/x/05_distill records=runs/x/02_records_chat": (
        "test_sft.py::test_family_loss_goes_down_and_export_reloads"
    ),
    "minima sft model=M train_files=[data/*.json] chat_format=alpaca loss_on=all": (
        "test_sft.py::test_train_files_build_records_and_chatml_tokens",
        "test_sft.py::test_loss_on_variants",
    ),
    "minima sft model=M records=R lora.enabled=true lora.merge=false zero_stage=3": (
        "test_sft.py::test_lora_zero3_merged_and_adapter_dir"
    ),
    "minima sft model=M records=R packing=true neftune_alpha=5 patience=3 eval_steps=200": (
        "test_sft.py::test_packing_neftune_instruction_loss",
        "test_sft.py::test_patience_exports_the_best_checkpoint",
    ),
    "minima sft model=M records=R strategy=fsdp launch.nproc_per_node=8": (
        "test_sft.py::test_fsdp_two_ranks_and_two_nodes_with_kill_and_resume"
    ),
    "minima records format=preference inputs=pairs.jsonl tokenizer=runs/x/06_sft out_dir=runs/x/06_records_pref "
    "max_length=1024 max_prompt_length=512 [preference_template=plain]": (
        "test_dpo.py::test_multi_turn_hh_plain_template_truncation_and_counts"
    ),
    "minima dpo model=runs/x/06_sft records=runs/x/06_records_pref": (
        "test_dpo.py::test_done_when_a_new_preference_is_learned"
    ),
    "minima dpo --preset minichat-3b model=M records=R precompute_ref=true": (
        "test_dpo.py::test_precomputed_reference_equals_online_and_resumes"
    ),
    "minima dpo model=M records=R loss.type=simpo loss.beta=2 loss.gamma=0.5": (
        "test_dpo.py::test_fsdp_matches_deepspeed"
    ),
    "minima dpo model=M records=R loss.type=orpo loss.sft_weight=1 lora.enabled=true strategy=fsdp": (
        "test_dpo.py::test_accumulation_is_exact_over_pairs",
        "test_dpo.py::test_fsdp_matches_deepspeed",
    ),
    "minima evaluate models.sft=runs/x/06_sft models.dpo=runs/x/06_dpo tasks=[preference] "
    "tasks.preference.path=heldout.jsonl": (
        "test_dpo.py::test_preference_task_equals_hand_logprobs",
        "test_evaluate.py::test_run_writes_results_samples_report_and_compare",
    ),
    "minima plan dpo --preset minichat-3b [precompute_ref=true]": (
        "test_dpo.py::test_plan_sizes_the_reference_with_and_without_precompute"
    ),
    "minima evaluate model=runs/x/06_sft tasks=[mmlu,ceval,cmmlu,gsm8k] limit=50": (
        "test_readme.py::test_readme_evaluate_example_runs_on_bundled_data"
    ),
    "minima evaluate compare runs/a/07_evaluate runs/b/07_evaluate": (
        "test_evaluate.py::test_run_writes_results_samples_report_and_compare"
    ),
    "minima evaluate model=M tasks=[mt_bench] tasks.mt_bench.path=question.jsonl judge_base_url=URL judge_model=NAME": (
        "test_evaluate_chat.py::test_mt_bench_in_evaluate_stage_resumes_and_reports_parsed_scores"
    ),
    "minima export model=runs/x/06_sft format=gguf dtype=q8_0 out_dir=runs/x/08_export": (
        "test_export.py::test_gguf_tensors_round_trip"
    ),
    "minima export model=runs/x/06_sft format=safetensors license=llama2 base_model=meta-llama/Llama-2-7b-hf "
    "out_dir=release/": "test_export.py::test_release_dir_loads_with_the_same_logits_and_no_training_state",
    "minima run --preset tiny export.enabled=true export.dtype=q8_0": (
        "test_export.py::test_pipeline_runs_export_last_only_when_enabled"
    ),
    "minima plan distill --preset minima-3b plan.gpus=16 plan.tokens=126e9": (
        "test_plan.py::test_plan_cli_prints_the_three_training_stages"
    ),
    "minima serve model=runs/x/06_sft [port=8000]": (
        "test_serve.py::test_models_and_greedy_chat_and_completion_match_hf_generate"
    ),
    "minima chat model=runs/x/06_sft": "test_engine.py::test_chat_replies_batched_equal_hf_and_the_terminal_chat",
    "minima self-instruct base_url=http://127.0.0.1:8000/v1 model=06_sft out=data/si.json "
    "num_instructions_to_generate=1000": "test_self_instruct.py::test_generates_n_items_over_http_with_retries",
    ".venv/bin/minima run --preset tiny --config my_pipeline.yaml": (
        "test_pipeline_e2e.py::test_every_artifact_exists_and_loads"
    ),
    ".venv/bin/minima run --config my_pipeline.yaml --from-stage distill": (
        "test_flow_mechanics.py::test_cache_from_stage_changed_field_and_failure"
    ),
    ".venv/bin/minima run --config my_pipeline.yaml --only-stage records_chat": (
        "test_flow_mechanics.py::test_select_steps"
    ),
    ".venv/bin/minima run --config my_pipeline.yaml distill.loss.temperature=2": (
        "test_flow_mechanics.py::test_cache_from_stage_changed_field_and_failure"
    ),
    ".venv/bin/minima run --config my_pipeline.yaml dpo.enabled=true records_pref.inputs=pairs.jsonl": (
        "test_flow_mechanics.py::test_optional_dpo_step"
    ),
    "export PREFECT_API_URL=http://127.0.0.1:4200/api MINIMA_ROOT=$PWD": (
        "test_deployment.py::test_deploy_worker_and_trigger_by_name"
    ),
    ".venv/bin/prefect server start --host 127.0.0.1 --port 4200 &": (
        "test_deployment.py::test_deploy_worker_and_trigger_by_name"
    ),
    ".venv/bin/prefect work-pool create minima-pool --type process": (
        "test_deployment.py::test_deploy_worker_and_trigger_by_name"
    ),
    ".venv/bin/prefect --no-prompt deploy --all": "test_deployment.py::test_deploy_worker_and_trigger_by_name",
    ".venv/bin/prefect worker start --pool minima-pool &": "test_deployment.py::test_deploy_worker_and_trigger_by_name",
    ".venv/bin/prefect deployment run 'minima-stage/prune' -p stage=prune -p preset=minima-3b "
    "-p 'overrides=[\"dry_run=true\"]' --watch": "test_deployment.py::test_deploy_worker_and_trigger_by_name",
    "minima adapt --preset minima-3b model=/data/llama2-7b-minima records=runs/minima-3b/02_records "
    "launch.launcher=slurm launch.nnodes=4 launch.gpus_per_node=8 launch.gpu=H100-80G launch.partition=gpu "
    "launch.account=myproj launch.time=3-00:00:00 launch.mem=0": (
        "test_slurm.py::test_fake_slurm_job_runs_and_streams_log",
        "test_plan.py::test_plan_cli_uses_the_launch_block_for_slurm_jobs",
    ),
    "minima evaluate model=runs/minima-3b/06_sft tasks=[mmlu,ceval,cmmlu] launch.launcher=slurm launch.nnodes=2 "
    "launch.gpus_per_node=8 launch.partition=gpu": (
        "test_stage_jobs.py::test_evaluate_job_on_two_ranks_equals_one_process",
        "test_stage_jobs.py::test_prune_job_under_fake_slurm_equals_in_process_prune",
    ),
}


def readme_commands() -> list[tuple[str, str]]:
    """(command, comment) of every line of README.md's fenced bash blocks, continuation lines joined."""
    import re

    out = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if not line.strip():
                continue
            cmd, _, comment = line.partition("  #")
            out.append((" ".join(cmd.split()), comment.strip()))
    return out


def test_every_readme_command_is_run_by_a_test_or_says_why_not():
    unmapped, stale = [], []
    for cmd, comment in readme_commands():
        tests = README_COMMANDS.get(cmd)
        if tests is None:
            if "not in CI:" not in comment:
                unmapped.append(cmd)
            continue
        for t in (tests,) if isinstance(tests, str) else tests:
            if t == "CI":
                continue
            f, name = t.split("::")
            if f"def {name}(" not in (ROOT / "tests" / f).read_text():
                stale.append(t)
    assert not unmapped, "README commands with no test and no 'not in CI: why' note:\n" + "\n".join(unmapped)
    assert not stale, f"README_COMMANDS names tests that do not exist: {stale}"
    gone = set(README_COMMANDS) - {c for c, _ in readme_commands()}
    assert not gone, f"README_COMMANDS lists commands README.md no longer has: {sorted(gone)}"
