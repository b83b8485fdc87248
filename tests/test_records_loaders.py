"""Named dataset loaders and columns mappings: raw public schemas -> the conversations records trains on.

Expected conversations are written by hand from the files' first rows; the shared ARC, MMLU, GSM8K,
Winogrande and Dolly files are read where ../shared/data is present.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import shared

from minima.core.config import RecordsConfig, Source
from minima.core.errors import ConfigError, DataError
from minima.data.formats import get_format, jax_prompt
from minima.data.records.inputs import SourceReader
from minima.data.records.loaders import LOADERS, loader_named, source_loader


def read(path: Path, loader: str, **kw) -> list:
    reader = SourceReader("chat", loader=LOADERS[loader], **kw)
    return [d.payload for d in reader.read(path)]


def user_reply(msgs):
    return msgs[-2], msgs[-1]["content"]


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------- shared files
def test_arc_shared_file():
    msgs = read(shared("eval/arc/arc_challenge_llmfoundry_500.jsonl"), "arc")
    assert len(msgs) == 500
    first = json.loads(shared("eval/arc/arc_challenge_llmfoundry_500.jsonl").read_text().splitlines()[0])
    user, reply = user_reply(msgs[0])
    assert user["content"] == first["query"].removeprefix("Question: ")
    assert user["choices"] == first["choices"] and reply == first["choices"][first["gold"]]
    easy = read(shared("eval/arc/arc_easy_llmfoundry_500.jsonl"), "arc")
    user, reply = user_reply(easy[0])
    assert user["content"] == "Which statement best explains why photosynthesis is the foundation of most food webs?"
    assert reply == "Sunlight is the source of energy for nearly all ecosystems."


def test_mmlu_shared_headerless_csv():
    path = shared("eval/mmlu/dev/abstract_algebra_dev.csv")
    msgs = read(path, "mmlu")
    assert len(msgs) == 5  # five dev questions per subject, no header row skipped
    user, reply = user_reply(msgs[0])
    assert user["content"] == "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field."
    assert user["choices"] == ["0", "1", "2", "3"] and reply == "1"  # answer B
    user, reply = user_reply(msgs[1])  # quoted fields with commas
    assert user["choices"] == ["True, True", "False, False", "True, False", "False, True"] and reply == "False, False"
    assert jax_prompt(msgs[0][0]) == (
        "### QUESTION:\nFind all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n\n"
        "### CHOICES:\n(0): 0 (1): 1 (2): 2 (3): 3\n\n### ANSWER:\n"
    )
    all_dev = []
    for f in sorted(path.parent.glob("*.csv")):
        all_dev += read(f, "mmlu")
    assert len(all_dev) == 285  # the README's count for the 57 dev files


def test_gsm8k_shared_file():
    msgs = read(shared("eval/gsm8k/test.jsonl"), "gsm8k")
    assert len(msgs) == 1319
    user, reply = user_reply(msgs[0])
    assert user["content"].startswith("Janet’s ducks lay 16 eggs per day.") and "choices" not in user
    assert reply.startswith("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.") and reply.endswith("#### 18")


def test_winogrande_shared_file_rebuilds_the_blank():
    msgs = read(shared("eval/winogrande/winogrande_llmfoundry_500.jsonl"), "winogrande")
    assert len(msgs) == 500
    user, reply = user_reply(msgs[0])
    assert user["content"] == "Sarah was a much better surgeon than Maria so _ always got the easier cases."
    assert user["options"] == ["Sarah", "Maria"] and reply == "Maria"
    user, reply = user_reply(msgs[1])
    assert reply == "Sarah"
    user, reply = user_reply(msgs[2])
    assert user["content"] == "They were worried the wine would ruin the bed and the blanket, but the _ was't ruined."
    assert user["options"] == ["blanket", "bed"]


def test_dolly_shared_sample_with_columns():
    path = shared("instruction/dolly_alpaca_prompt_151.jsonl")
    loader = source_loader("dolly151", None, {"prompt": "prompt", "response": "answer"}, "inputs[dolly151]")
    msgs = [d.payload for d in SourceReader("chat", loader=loader).read(path)]
    first = json.loads(path.read_text().splitlines()[0])
    assert len(msgs) == 151
    assert msgs[0] == [
        {"role": "user", "content": first["prompt"]},
        {"role": "assistant", "content": first["answer"]},
    ]


# ----------------------------------------------------------------------------- raw schemas
def test_arc_ai2_schema_letters_and_digits(tmp_path):
    rows = [
        {
            "id": "x1",
            "question": {
                "stem": "Which is a gas?",
                "choices": [{"text": t, "label": lab} for t, lab in zip(["ice", "steam", "rock"], "ABC")],
            },
            "answerKey": "B",
        },
        {
            "id": "x2",
            "question": {
                "stem": "Pick four.",
                "choices": [{"text": str(i + 1), "label": str(i + 1)} for i in range(4)],
            },
            "answerKey": "4",
        },
        {
            "question": "HF form?",
            "choices": {"text": ["a", "b", "c", "d", "e"], "label": list("ABCDE")},
            "answerKey": "E",
        },
    ]
    msgs = read(jsonl(tmp_path / "arc.jsonl", rows), "arc")
    assert [user_reply(m)[1] for m in msgs] == ["steam", "4", "e"]
    assert msgs[0][0] == {"role": "user", "content": "Which is a gas?", "choices": ["ice", "steam", "rock"]}


def test_instruction_loaders(tmp_path):
    cases = {
        "winogrande": (
            {"sentence": "Tom gave Bob a gift because _ was kind.", "option1": "Tom", "option2": "Bob", "answer": "1"},
            ("Tom gave Bob a gift because _ was kind.", "Tom"),
        ),
        "cot-collection": (
            {"source": "Is 7 prime?", "rationale": "7 has no divisors but 1 and 7.", "target": "yes", "task": "t"},
            ("Is 7 prime?", "7 has no divisors but 1 and 7.\n\nyes"),
        ),
        "openorca-mc": (
            {"id": "1", "system_prompt": "Be brief.", "question": "2+2? A) 3 B) 4", "response": "B) 4"},
            ("2+2? A) 3 B) 4", "B) 4"),
        ),
        "dolly": (
            {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"},
            ("Summarise.\nA long text.", "Short."),
        ),
        "firefly": ({"kind": "poem", "input": "写一首诗", "target": "春眠不觉晓"}, ("写一首诗", "春眠不觉晓")),
        "gpt4all": ({"prompt": "Hi?", "response": "Hello.", "source": "x"}, ("Hi?", "Hello.")),
        "cot": (
            {"instruction": "Add 2 and 3.", "input": "", "output": "2+3=5. The answer is 5."},
            ("Add 2 and 3.", "2+3=5. The answer is 5."),
        ),
    }
    for name, (rec, (user, reply)) in cases.items():
        msgs = read(jsonl(tmp_path / f"{name}.jsonl", [rec]), name)[0]
        u, r = user_reply(msgs)
        assert (u["content"], r) == (user, reply), name
    orca = read(tmp_path / "openorca-mc.jsonl", "openorca-mc")[0]
    assert orca[0] == {"role": "system", "content": "Be brief."}
    dolly = read(tmp_path / "dolly.jsonl", "dolly")[0]
    assert dolly[0]["input"] == "A long text."  # the alpaca format's "### Input:" block
    oig = jsonl(
        tmp_path / "oig.jsonl",
        [{"text": "<human>: Hi there\n<bot>: Hello!\n<human>: Bye\n<bot>: Bye.", "metadata": {}}],
    )
    assert read(oig, "oig")[0] == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."},
    ]


def test_columns_history_system_and_messages(tmp_path):
    rec = {"q": "And 3+3?", "a": "6", "h": [["1+1?", "2"]], "sys": "Math tutor."}
    loader = source_loader("x", None, {"prompt": "q", "response": "a", "history": "h", "system": "sys"}, "w")
    assert loader.to_messages(rec) == [
        {"role": "system", "content": "Math tutor."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    tags = {"messages": "conv", "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}
    loader = source_loader("y", None, tags, "w")
    conv = {"conv": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hey"}]}
    assert loader.to_messages(conv) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]
    with pytest.raises(ConfigError, match="prompt and response"):
        source_loader("z", None, {"prompt": "q"}, "w")
    with pytest.raises(ConfigError, match="unknown columns"):
        source_loader("z", None, {"prompt": "q", "response": "a", "answer": "b"}, "w")


def test_errors_name_file_line_and_column(tmp_path):
    loader = source_loader("d", None, {"prompt": "instruction", "response": "output"}, "w")
    good = {"instruction": "a", "output": "b"}
    path = jsonl(tmp_path / "d.jsonl", [good, {"instruction": "c"}, good])
    with pytest.raises(DataError) as e:
        list(SourceReader("chat", loader=loader).read(path))
    assert f"{path}:2" in str(e.value) and "'output'" in str(e.value) and "missing column" in str(e.value)
    skipped = []
    reader = SourceReader("chat", loader=loader, on_skip=lambda w, r: skipped.append((w, r)))
    assert len(list(reader.read(path))) == 2 and skipped[0][0] == f"{path}:2"
    # The wrong loader for a file stops at its first record, whatever on_error says.
    with pytest.raises(ConfigError) as e:
        list(SourceReader("chat", loader=LOADERS["gsm8k"], on_skip=lambda w, r: None).read(path))
    assert f"{path}:1" in str(e.value) and "'question'" in str(e.value)


def test_loader_selection_by_name():
    assert loader_named("arc").name == "arc" and loader_named("arc-easy").name == "arc"
    assert loader_named("winogrande_xl").name == "winogrande"
    assert loader_named("cot-collection").name == "cot-collection" and loader_named("cot_alpaca").name == "cot"
    assert loader_named("orca") is None and loader_named("archive") is None
    assert source_loader("gsm8k", "none", None, "w") is None
    with pytest.raises(ConfigError, match="unknown loader"):
        source_loader("s", "nope", None, "w")


# ------------------------------------------------------------------------------ records build
def test_records_build_mixes_named_sources(tmp_path, tiny_tokenizer_dir):
    """A chat build of raw ARC (AI2), MMLU (headerless CSV) and Winogrande writes the mc format's ids."""
    from tfrecord.reader import example_loader
    from transformers import AutoTokenizer

    from minima.stages.records import run

    arc = [
        {
            "question": {"stem": f"Q{i}?", "choices": [{"text": c, "label": lab} for c, lab in zip("wxyz", "1234")]},
            "answerKey": str(1 + i % 4),
        }
        for i in range(6)
    ]
    jsonl(tmp_path / "arc.jsonl", arc)
    (tmp_path / "mmlu").mkdir()
    (tmp_path / "mmlu" / "m_dev.csv").write_text('What is 1+1?,1,2,3,4,B\n"Pick, one",a,b,c,d,D\n', encoding="utf-8")
    wino = [{"sentence": "A hit B so _ cried.", "option1": "A", "option2": "B", "answer": "2"}] * 3
    jsonl(tmp_path / "wino.jsonl", wino)
    art = run(
        RecordsConfig(
            out_dir=str(tmp_path / "rec"),
            tokenizer=str(tiny_tokenizer_dir),
            format="chat",
            chat_format="mc",
            max_length=256,
            dev_fraction=0.0,
            shuffle=False,
            inputs=[
                Source(name="arc", path=str(tmp_path / "arc.jsonl")),
                Source(name="mmlu", path=str(tmp_path / "mmlu")),
                Source(name="wg", path=str(tmp_path / "wino.jsonl"), loader="winogrande", size=2),
            ],
        )
    )
    m = art.metrics
    assert m["source_names"] == ["arc", "mmlu", "wg"]
    assert [m["sources"][s]["docs_after"] for s in m["source_names"]] == [6, 2, 2]
    recs = []
    for f in sorted((art.path / "train").glob("part-*.tfrecord")):
        recs += list(example_loader(str(f), None))
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    fmt = get_format("mc")
    expected = [LOADERS["arc"].to_messages(r) for r in arc]
    expected += [LOADERS["mmlu"].to_messages(["What is 1+1?", "1", "2", "3", "4", "B"])]
    expected += [LOADERS["mmlu"].to_messages(["Pick, one", "a", "b", "c", "d", "D"])]
    expected += [LOADERS["winogrande"].to_messages(w) for w in wino[:2]]
    assert len(recs) == len(expected)
    for r, msgs in zip(recs, expected):
        ids, mask = fmt.encode(tok, msgs)
        assert r["indices"].tolist() == ids and r["mask"].tolist() == mask
    assert [int(r["source"][0]) for r in recs] == [0] * 6 + [1] * 2 + [2] * 2
    assert expected[6][-1]["content"] == "2" and expected[7][-1]["content"] == "d" and expected[8][-1]["content"] == "B"


def test_loader_needs_chat_format(tmp_path, tiny_tokenizer_dir):
    from minima.stages.records import run

    jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "a"}] * 3)
    cfg = RecordsConfig(
        out_dir=str(tmp_path / "rec"),
        tokenizer=str(tiny_tokenizer_dir),
        inputs=[Source(name="g", path=str(tmp_path / "g.jsonl"), loader="gsm8k")],
    )
    with pytest.raises(ConfigError, match="format=chat"):
        run(cfg)


def test_readme_mixing_and_columns_examples_run(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """The README's named-dataset and columns commands build on ../shared/data as written."""
    import shlex

    from minima.cli import main

    shared("eval/arc")
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    cmds = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("minima records format=chat chat_format=")]
    cmds = [c for c in cmds if "../shared/data" in c]
    assert len(cmds) == 2, cmds
    monkeypatch.chdir(root)
    for i, cmd in enumerate(cmds):
        args = shlex.split(cmd)[1:]
        args = [a for a in args if not a.startswith(("tokenizer=", "out_dir="))]
        args += [f"tokenizer={tiny_tokenizer_dir}", f"out_dir={tmp_path / f'r{i}'}"]
        assert main(args) == 0, cmd
    mix = json.loads((tmp_path / "r0" / "manifest.json").read_text())["metrics"]
    assert mix["source_names"] == ["arc", "mmlu", "gsm8k", "winogrande"]
    assert [mix["sources"][n]["docs_after"] for n in mix["source_names"]] == [1000, 29, 200, 100]  # all, 10% of 285
    assert main(["analyze", f"records={tmp_path / 'r0'}"]) == 0


def test_mc_loader_read_as_instruction(tmp_path):
    path = shared("eval/mmlu/dev/abstract_algebra_dev.csv")
    msgs = [d.payload for d in SourceReader("chat", shape="instruction", loader=LOADERS["mmlu"]).read(path)]
    assert msgs[0] == [
        {
            "role": "user",
            "content": "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n\n(0): 0 (1): 1 (2): 2 (3): 3",
        },
        {"role": "assistant", "content": "1"},
    ]
    wino = jsonl(tmp_path / "w.jsonl", [{"sentence": "A _ B.", "option1": "x", "option2": "y", "answer": "2"}])
    msgs = [d.payload for d in SourceReader("chat", shape="instruction", loader=LOADERS["winogrande"]).read(wino)]
    assert msgs[0][0] == {"role": "user", "content": "A _ B.\n\n(0): x (1): y"} and msgs[0][1]["content"] == "y"
