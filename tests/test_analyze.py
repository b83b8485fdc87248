"""``minima analyze``: per-source counts equal a count from the chat format itself, and the loss per source
equals a direct HF forward with labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minima.core.config import RecordsConfig, Source
from minima.data.formats import get_format, normalise_conversation

QA = [{"instruction": f"Give the number after {i}.", "input": "", "output": f"{i + 1}"} for i in range(7)]
LONG = [
    {
        "instruction": "Write a short note about the sea.",
        "input": "",
        "output": "The sea is wide and deep. " * (1 + i % 3),
    }
    for i in range(5)
]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_tokenizer_dir):
    from minima.stages.records import run

    d = tmp_path_factory.mktemp("analyze")
    (d / "qa.json").write_text(json.dumps(QA))
    (d / "long.json").write_text(json.dumps(LONG))
    art = run(
        RecordsConfig(
            out_dir=str(d / "rec"),
            tokenizer=str(tiny_tokenizer_dir),
            format="chat",
            chat_format="minichat",
            max_length=512,
            dev_fraction=0.25,
            inputs=[Source(name="qa", path=str(d / "qa.json")), Source(name="long", path=str(d / "long.json"))],
        )
    )
    assert art.metrics["num_records"]["dev"] > 0  # both splits are read
    return art.path


def _encoded(tok, rows):
    fmt = get_format("minichat")
    return [fmt.encode(tok, normalise_conversation(r)) for r in rows]


def test_counts_and_ratio_match_a_count_from_the_format(built, tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from minima.stages.analyze import AnalyzeConfig, analyze

    res = analyze(AnalyzeConfig(records=str(built), out_dir=str(tmp_path / "out")))
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    for name, rows in (("qa", QA), ("long", LONG)):
        enc = _encoded(tok, rows)
        tokens = sum(len(ids) for ids, _ in enc)
        out = sum(sum(m) for _, m in enc)
        s = res["sources"][name]
        assert (s["records"], s["tokens"], s["output_tokens"], s["instruction_tokens"]) == (
            len(rows),
            tokens,
            out,
            tokens - out,
        )
        assert s["length_ratio"] == pytest.approx((tokens - out) / out, abs=1e-6)
        per = [(len(ids) - sum(m)) / sum(m) for ids, m in enc]
        assert s["mean_record_ratio"] == pytest.approx(sum(per) / len(per), abs=1e-6)
    assert res["sources"]["qa"]["length_ratio"] > res["sources"]["long"]["length_ratio"]
    assert json.loads((tmp_path / "out" / "analyze.json").read_text())["sources"] == res["sources"]
    assert (tmp_path / "out" / "analyze.png").stat().st_size > 0


def test_loss_per_source_equals_hf_forward(built, tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from minima.cli import main

    out = tmp_path / "out"
    assert main(["analyze", f"records={built}", f"model={tiny_model_dir}", f"out_dir={out}", "batch_size=3"]) == 0
    res = json.loads((out / "analyze.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for name, rows in (("qa", QA), ("long", LONG)):
        num = den = num_all = den_all = 0.0
        for ids, mask in _encoded(tok, rows):
            x = torch.tensor([ids])
            labels = torch.tensor([[i if m else -100 for i, m in zip(ids, mask)]])
            with torch.no_grad():
                n = int((labels[0, 1:] != -100).sum())
                num += float(model(input_ids=x, labels=labels).loss) * n
                den += n
                num_all += float(model(input_ids=x, labels=x).loss) * (len(ids) - 1)
                den_all += len(ids) - 1
        assert res["sources"][name]["loss"] == pytest.approx(num / den, abs=1e-4)
        assert res["sources"][name]["loss_all"] == pytest.approx(num_all / den_all, abs=1e-4)


def test_lm_records_report_one_source(tmp_path, tiny_tokenizer_dir):
    from minima.stages.analyze import AnalyzeConfig, analyze
    from minima.stages.records import run

    text = Path(tmp_path / "t.txt")
    text.write_text("one two three\nfour five\n")
    art = run(
        RecordsConfig(
            out_dir=str(tmp_path / "rec"),
            tokenizer=str(tiny_tokenizer_dir),
            max_length=16,
            dev_fraction=0.0,
            inputs=[Source(name="t", path=str(text))],
        )
    )
    res = analyze(AnalyzeConfig(records=str(art.path)))
    assert list(res["sources"]) == ["all"] and res["format"] == "lm"
    assert res["sources"]["all"]["tokens"] == art.metrics["total_tokens"]
    assert res["manifest_tokens"] == {"t": art.metrics["sources"]["t"]["tokens_after"]}
    assert Path(str(art.path) + "_analyze", "analyze.json").is_file()
