"""The records builder: lossless packing, chat masks, worker invariance, mixing, caching, bad input.

Records are read back with the ``tfrecord`` package's own loader (an independent implementation of
the file format), and token ids are compared against the tokenizer itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import shared

from minima.core.config import RecordsConfig, Source
from minima.core.errors import ArtifactError, ConfigError, DataError, InputError
from minima.data.formats import get_format, normalise_conversation
from minima.stages.records import run

CJK = re.compile(r"[\u4e00-\u9fff]")


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def tok_dir(tiny_tokenizer_dir):
    return tiny_tokenizer_dir


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from minima.data.tokenizers import save_sp_tokenizer

    return save_sp_tokenizer(shared("tokenizers/llama2_tokenizer.model"), tmp_path_factory.mktemp("llama2") / "tok")


def read_split(out: Path, split: str) -> list[dict]:
    """Every record of a split in file order, via the tfrecord package's reader."""
    from tfrecord.reader import example_loader

    recs = []
    for f in sorted((out / split).glob("part-*.tfrecord")):
        recs += list(example_loader(str(f), None))
    return recs


def lm_docs(recs: list[dict], bos: int, eos: int) -> list[list[int]]:
    """Undo the packing: drop the tail padding, split at EOS, strip BOS."""
    stream = (
        np.concatenate([r["indices"][r["mask"] == 1] if "mask" in r else r["indices"] for r in recs])
        if recs
        else np.zeros(0, int)
    )
    ends = np.flatnonzero(stream == eos)
    assert len(ends) == 0 or ends[-1] == len(stream) - 1, "the stream must end with an EOS"
    docs, start = [], 0
    for e in ends:
        doc = stream[start:e]
        assert doc[0] == bos, "each document starts with BOS"
        docs.append(doc[1:].tolist())
        start = e + 1
    return docs


def text_docs(path: Path, limit: int) -> list[str]:
    """Non-blank lines (LF or CRLF) of a text file, as the .txt reader defines documents."""
    lines = path.read_bytes().decode("utf-8").split("\n")[:limit]
    return [x[:-1] if x.endswith("\r") else x for x in lines if x.strip()]


def write_lines(path: Path, src: Path, limit: int) -> Path:
    path.write_bytes(b"".join(src.read_bytes().splitlines(keepends=True)[:limit]))
    return path


def build(tmp_path: Path, name: str = "rec", **kw):
    kw.setdefault("max_length", 64)
    kw.setdefault("dev_fraction", 0.0)
    return run(RecordsConfig(out_dir=str(tmp_path / name), **kw))


# ----------------------------------------------------------------------------------- lossless
def test_lm_is_lossless_on_real_english_and_chinese_text(tmp_path, llama_dir):
    from transformers import AutoTokenizer

    shk = write_lines(tmp_path / "shakespeare.txt", shared("text/tinyshakespeare.txt"), 600)
    hlm = write_lines(tmp_path / "hongloumeng.txt", shared("text/hongloumeng_prefix_1.5MB.txt"), 150)  # CRLF
    c4 = write_lines(tmp_path / "c4.jsonl", shared("text/c4_demo.jsonl"), 30)
    want = text_docs(shk, 600) + text_docs(hlm, 150) + [json.loads(x)["text"] for x in c4.read_text().splitlines()]
    art = build(
        tmp_path,
        tokenizer=str(llama_dir),
        shuffle=False,
        max_length=256,
        inputs=[Source(name="en", path=str(shk)), Source(name="zh", path=str(hlm)), Source(name="c4", path=str(c4))],
    )
    m = art.metrics
    tok = AutoTokenizer.from_pretrained(str(art.path / "tokenizer"))
    recs = read_split(art.path, "train")
    assert all(len(r["indices"]) == 256 for r in recs), "every record is exactly max_length"
    assert ["mask" in r for r in recs] == [False] * (len(recs) - 1) + [True], "only the tail record is padded"
    docs = lm_docs(recs, m["bos_id"], m["eos_id"])
    assert [tok.decode(d) for d in docs] == want
    assert m["num_docs"]["train"] == len(want) and m["sources"]["zh"]["docs_after"] == len(text_docs(hlm, 150))
    assert m["num_tokens"]["train"] == sum(len(d) + 2 for d in docs) == m["total_tokens"]
    assert m["num_records"]["train"] * 256 - m["padding_tokens"]["train"] == m["total_tokens"]
    assert m["vocab_size"] == 32000 and m["bytes_per_token"] == pytest.approx(
        sum(m["bytes"].values()) / m["total_tokens"], abs=1e-3
    )


def test_lm_ids_match_the_tokenizer_and_dev_split_keeps_every_doc(tmp_path, demo_data_dir, tok_dir, tok):
    en = demo_data_dir / "text" / "pretrain_en.txt"
    zh = demo_data_dir / "text" / "pretrain_zh.txt"
    want = text_docs(en, 10**9) + text_docs(zh, 10**9)
    art = build(
        tmp_path, tokenizer=str(tok_dir), inputs=str(demo_data_dir / "text" / "*.txt"), dev_fraction=0.1, max_length=100
    )
    m = art.metrics
    train = lm_docs(read_split(art.path, "train"), tok.bos_token_id, tok.eos_token_id)
    dev = lm_docs(read_split(art.path, "dev"), tok.bos_token_id, tok.eos_token_id)
    assert len(dev) == round(0.1 * len(want)) == m["num_docs"]["dev"]
    ref = dict(zip(want, tok(want, add_special_tokens=False)["input_ids"]))
    got = sorted(tok.decode(d) for d in train + dev)
    assert got == sorted(want)
    assert all(ref[tok.decode(d)] == d for d in train[:200] + dev)  # ids are the tokenizer's own
    assert sum(CJK.search(tok.decode(d)) is not None for d in train[:100]) not in (0, 100), (
        "shuffled: sources are mixed"
    )
    assert (art.path / "tokenizer" / "tokenizer.model").is_file()


def test_lowercase_and_txt_file_mode(tmp_path, tok_dir, tok):
    (tmp_path / "a.txt").write_text("Hello World.\nSecond LINE\n")
    (tmp_path / "b.txt").write_text("Another File")
    art = build(
        tmp_path,
        tokenizer=str(tok_dir),
        inputs=str(tmp_path / "*.txt"),
        txt_document="file",
        lowercase=True,
        shuffle=False,
    )
    docs = [tok.decode(d) for d in lm_docs(read_split(art.path, "train"), tok.bos_token_id, tok.eos_token_id)]
    assert docs == ["hello world.\nsecond line\n", "another file"]


def test_parquet_csv_and_json_array_readers(tmp_path, tok_dir, tok):
    import pandas as pd

    texts = ["alpha beta", "第二 条", 'gamma, "quoted"\nnewline']
    pd.DataFrame({"body": texts, "n": [1, 2, 3]}).to_parquet(tmp_path / "a.parquet")
    pd.DataFrame({"body": texts}).to_csv(tmp_path / "b.csv", index=False)
    (tmp_path / "c.json").write_text(json.dumps([{"body": t} for t in texts], indent=2))
    art = build(tmp_path, tokenizer=str(tok_dir), inputs=str(tmp_path / "*.*"), text_key="body", shuffle=False)
    docs = [tok.decode(d) for d in lm_docs(read_split(art.path, "train"), tok.bos_token_id, tok.eos_token_id)]
    assert docs == texts * 3


# ---------------------------------------------------------------------------------------- chat
def test_chat_masks_decode_to_replies_with_turn_boundary_truncation(tmp_path, llama_dir):
    from transformers import AutoTokenizer

    sg = json.loads(shared("chat/sharegpt_v3_sample50.json").read_text())[:10]
    fc = json.loads(shared("chat/fastchat_dummy_conversation.json").read_text())[:40]
    az = json.loads(shared("instruction/alpaca_zh_first1000.json").read_text())[:40]
    for name, data in (("sg.json", sg), ("fc.json", fc), ("az.json", az)):
        (tmp_path / name).write_text(json.dumps(data, ensure_ascii=False))
    max_len = 64
    art = build(
        tmp_path,
        tokenizer=str(llama_dir),
        format="chat",
        shuffle=False,
        max_length=max_len,
        inputs=[
            Source(name="sharegpt", path=str(tmp_path / "sg.json")),
            Source(name="fastchat", path=str(tmp_path / "fc.json")),
            Source(name="alpaca_zh", path=str(tmp_path / "az.json")),
        ],
    )
    tok = AutoTokenizer.from_pretrained(str(llama_dir))
    fmt = get_format("minichat")
    # Reference: keep the longest run of whole exchanges that fits; none -> dropped.
    expected, truncated, dropped = [], 0, 0
    for rec in sg + fc + az:
        msgs = normalise_conversation(rec)
        groups = fmt.encode_exchanges(tok, msgs)
        total, keep = len(groups[0][0]), 0
        for ids, _ in groups[1:]:
            if total + len(ids) > max_len:
                break
            total += len(ids)
            keep += 1
        if keep == 0:
            dropped += 1
            continue
        truncated += keep < len(groups) - 1
        expected.append([m["content"] for m in msgs if m["role"] == "assistant"][:keep])
    assert truncated > 0 and dropped > 0, "the slice must exercise both cases"
    recs = read_split(art.path, "train")
    assert len(recs) == len(expected)
    for r, replies in zip(recs, expected):
        ids, mask = r["indices"].tolist(), r["mask"].tolist()
        assert len(ids) <= max_len and ids[-1] == tok.eos_token_id
        runs, cur = [], []
        for i, k in zip(ids, mask):
            if k:
                cur.append(i)
            elif cur:
                runs.append(cur)
                cur = []
        runs.append(cur)
        assert [tok.decode(x[:-1]) for x in runs] == replies
    m = art.metrics
    assert (m["truncated"], m["dropped_too_long"]) == (truncated, dropped)
    assert sum(s["dropped_too_long"] for s in m["sources"].values()) == dropped


def test_chat_overflow_drop_and_demo_chat(tmp_path, demo_data_dir, tok_dir):
    chat = demo_data_dir / "chat" / "demo_chat.json"
    art = build(
        tmp_path,
        tokenizer=str(tok_dir),
        format="chat",
        inputs=str(chat),
        max_length=96,
        overflow="drop",
        dev_fraction=0.05,
    )
    n = len(json.loads(chat.read_text()))
    m = art.metrics
    assert m["num_records"]["train"] + m["num_records"]["dev"] + m["dropped_too_long"] == n and m["truncated"] == 0
    assert m["num_records"]["dev"] == round(0.05 * n)


# ---------------------------------------------------------------------------- worker invariance
@pytest.mark.parametrize("fmt", ["lm", "chat"])
def test_output_bytes_do_not_depend_on_num_workers(tmp_path, demo_data_dir, tok_dir, fmt):
    inputs = str(demo_data_dir / ("text/*.txt" if fmt == "lm" else "chat/demo_chat.json"))
    outs = []
    for w in (1, 2):
        art = build(
            tmp_path,
            f"w{w}",
            tokenizer=str(tok_dir),
            inputs=inputs,
            format=fmt,
            num_workers=w,
            chunk_size=40,
            shard_size=300,
            dev_fraction=0.05,
        )
        outs.append(art.path)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.suffix in (".tfrecord", ".index"))
    assert len(files) >= 4, "several shards per split"
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    assert sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.suffix in (".tfrecord", ".index")) == files


def test_index_files_match_the_tfrecord_tool(tmp_path, demo_data_dir, tok_dir):
    from tfrecord.tools.tfrecord2idx import create_index

    art = build(
        tmp_path,
        tokenizer=str(tok_dir),
        inputs=str(demo_data_dir / "chat" / "demo_chat.json"),
        format="chat",
        shard_size=100,
    )
    for f in (art.path / "train").glob("*.tfrecord"):
        create_index(str(f), str(tmp_path / "ref.index"))
        assert (tmp_path / "ref.index").read_text() == f.with_suffix(".index").read_text()


# -------------------------------------------------------------------------------------- mixing
def _mix(tmp_path, demo_data_dir, tok_dir, name, en, zh, seed=0):
    art = build(
        tmp_path,
        name,
        tokenizer=str(tok_dir),
        seed=seed,
        inputs=[
            Source(name="en", path=str(demo_data_dir / "text" / "pretrain_en.txt"), **en),
            Source(name="zh", path=str(demo_data_dir / "text" / "pretrain_zh.txt"), **zh),
        ],
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    docs = [tok.decode(d) for d in lm_docs(read_split(art.path, "train"), tok.bos_token_id, tok.eos_token_id)]
    en_docs = set(text_docs(demo_data_dir / "text" / "pretrain_en.txt", 10**9))
    zh_docs = set(text_docs(demo_data_dir / "text" / "pretrain_zh.txt", 10**9))
    assert not en_docs & zh_docs and all(d in en_docs or d in zh_docs for d in docs)
    n_en = sum(d in en_docs for d in docs)
    return art, n_en, len(docs) - n_en


def test_mixing_exact_sizes_weights_and_seed(tmp_path, demo_data_dir, tok_dir):
    n_en = len(text_docs(demo_data_dir / "text" / "pretrain_en.txt", 10**9))
    n_zh = len(text_docs(demo_data_dir / "text" / "pretrain_zh.txt", 10**9))
    art, en, zh = _mix(tmp_path, demo_data_dir, tok_dir, "sizes", {"size": "10%"}, {"size": 1000})
    assert (en, zh) == (int(n_en * 0.1 + 0.5), 1000)
    assert art.metrics["sources"]["en"]["docs_before"] == n_en and art.metrics["sources"]["en"]["docs_after"] == en

    art, en, zh = _mix(tmp_path, demo_data_dir, tok_dir, "weights", {"weight": 1}, {"weight": 3})
    total = en + zh
    assert abs(en - total / 4) <= 1 and abs(zh - 3 * total / 4) <= 1
    assert zh == n_zh or en == n_en, "the scarcer source (relative to its weight) is used in full"

    a1, *_ = _mix(tmp_path, demo_data_dir, tok_dir, "s1", {"size": 300}, {"size": "5%"}, seed=1)
    a2, *_ = _mix(tmp_path, demo_data_dir, tok_dir, "s2", {"size": 300}, {"size": "5%"}, seed=1)
    a3, *_ = _mix(tmp_path, demo_data_dir, tok_dir, "s3", {"size": 300}, {"size": "5%"}, seed=2)
    b = [(a.path / "train" / "part-00000.tfrecord").read_bytes() for a in (a1, a2, a3)]
    assert b[0] == b[1] and b[0] != b[2]


def test_mixing_counts_unit():
    from minima.data.records.mixing import (
        SourcePlan,
        choose,
        fixed_count,
        plan_counts,
        weighted_counts,
    )

    assert (
        fixed_count("10%", 1005, "x") == 101 and fixed_count("12.5%", 4, "x") == 1 and fixed_count("all", 7, "x") == 7
    )
    with pytest.raises(ConfigError, match="has 10 documents"):
        fixed_count(11, 10, "x")
    for avail, w in [
        ([100, 100, 100], [1, 2, 3]),
        ([7, 1000], [0.3, 0.7]),
        ([5, 5], [1, 1]),
        ([13, 29, 31], [0.2, 0.5, 0.3]),
        ([2036, 2036], [1, 3]),  # equal remainders (678.5, 2035.5): the scarce source gets the extra document
    ]:
        c = weighted_counts(avail, w)
        tot = sum(c)
        assert all(x <= a for x, a in zip(c, avail))
        assert all(abs(x - wi / sum(w) * tot) < 1 for x, wi in zip(c, w)), (avail, w, c)
        assert any(x == a for x, a in zip(c, avail)) or tot >= min(a / (wi / sum(w)) for a, wi in zip(avail, w)) - len(
            w
        )
    assert weighted_counts([2036, 2036], [1, 3]) == [678, 2036]
    assert plan_counts([SourcePlan("a", 50, "all"), SourcePlan("b", 10, weight=1), SourcePlan("c", 100, weight=1)]) == [
        50,
        10,
        10,
    ]
    idx = choose(100, 10, 0, "a")
    assert len(set(idx.tolist())) == 10 and list(idx) == sorted(idx) and (choose(100, 10, 0, "a") == idx).all()
    with pytest.raises(ValueError, match="not both"):
        Source(name="x", path="p", size=10, weight=1)


# -------------------------------------------------------------------------- caching and errors
def test_cache_skips_identical_builds_and_notices_changes(tmp_path, tok_dir):
    f = tmp_path / "a.txt"
    f.write_text("one\ntwo\n")
    cfg = dict(tokenizer=str(tok_dir), inputs=str(tmp_path / "a*.txt"))  # a glob: hashed by file stats
    first = build(tmp_path, **cfg)
    assert not first.skipped
    again = build(tmp_path, **cfg, num_workers=2)  # num_workers does not change the output
    assert again.skipped and again.cache_key == first.cache_key
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))  # input stats changed
    with pytest.raises(ArtifactError, match="different records artifact"):
        build(tmp_path, **cfg)
    rebuilt = run(RecordsConfig(out_dir=str(tmp_path / "rec"), max_length=64, dev_fraction=0.0, **cfg), force=True)
    assert not rebuilt.skipped and rebuilt.cache_key != first.cache_key
    with pytest.raises(ArtifactError):
        build(tmp_path, **cfg, max_length=32)  # config changed


def _no_partial(tmp_path: Path, name: str = "rec"):
    assert not (tmp_path / name).exists() and not (tmp_path / f"{name}.partial").exists()


def test_malformed_json_line_stops_with_file_and_line(tmp_path, tok_dir):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n')
    with pytest.raises(DataError, match=re.escape(f"{f}:3") + ".*malformed JSON"):
        build(tmp_path, tokenizer=str(tok_dir), inputs=str(f))
    _no_partial(tmp_path)
    art = build(tmp_path, "skip", tokenizer=str(tok_dir), inputs=str(f), on_error="skip")
    rows = [json.loads(x) for x in (art.path / "skipped.jsonl").read_text().splitlines()]
    assert [r["where"] for r in rows] == [f"{f}:3"] and "malformed JSON" in rows[0]["reason"]
    assert art.metrics["skipped"] == 1 and art.metrics["num_docs"]["train"] == 3


def test_bad_chat_record_names_its_line_in_a_json_array(tmp_path, tok_dir):
    f = tmp_path / "c.json"
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    bad = {"conversations": [{"from": "gpt", "value": "yo"}]}
    f.write_text(json.dumps([good, good, bad], indent=1))
    lines = [i + 1 for i, x in enumerate(f.read_text().splitlines()) if x == " {"]  # where each record opens
    assert len(lines) == 3
    with pytest.raises(DataError, match=re.escape(f"{f}:{lines[2]} (record 2)") + ".*should be a user turn"):
        build(tmp_path, tokenizer=str(tok_dir), inputs=str(f), format="chat")
    _no_partial(tmp_path)


def test_clear_errors_for_empty_input_unknown_key_and_no_eos(tmp_path, tok_dir):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(InputError, match="no documents"):
        build(tmp_path, tokenizer=str(tok_dir), inputs=str(tmp_path / "empty.txt"))
    with pytest.raises(InputError, match="no input files match"):
        build(tmp_path, tokenizer=str(tok_dir), inputs=str(tmp_path / "nothing*.jsonl"))
    (tmp_path / "d.jsonl").write_text('{"content": "x", "id": 1}\n')
    with pytest.raises(ConfigError, match="text_key 'text' is not a field.*content, id"):
        build(tmp_path, tokenizer=str(tok_dir), inputs=str(tmp_path / "d.jsonl"))
    no_eos = tmp_path / "tok_no_eos"
    shutil.copytree(tok_dir, no_eos)
    cfg = json.loads((no_eos / "tokenizer_config.json").read_text())
    cfg["eos_token"] = None
    (no_eos / "tokenizer_config.json").write_text(json.dumps(cfg))
    from transformers import AutoTokenizer

    if AutoTokenizer.from_pretrained(str(no_eos)).eos_token_id is not None:
        pytest.skip("this transformers version restores an EOS token from tokenizer.json")
    with pytest.raises(ConfigError, match="no EOS token"):
        build(tmp_path, tokenizer=str(no_eos), inputs=str(tmp_path / "d.jsonl"), text_key="content")
    _no_partial(tmp_path)


def test_a_records_artifact_serves_as_tokenizer_dir(tmp_path, tok_dir, tok):
    """The tokenizer/ copy inside an artifact is found when the artifact dir itself is given."""
    (tmp_path / "a.txt").write_text("one two\nthree\n")
    first = build(tmp_path, "first", tokenizer=str(tok_dir), inputs=str(tmp_path / "a.txt"))
    second = build(tmp_path, "second", tokenizer=str(first.path), inputs=str(tmp_path / "a.txt"))
    assert (second.path / "train" / "part-00000.tfrecord").read_bytes() == (
        first.path / "train" / "part-00000.tfrecord"
    ).read_bytes()
    assert second.metrics["vocab_size"] == len(tok)


def test_cli_builds_records(tmp_path, tok_dir, capsys):
    from minima.cli import main

    (tmp_path / "a.txt").write_text("one two\nthree\n")
    out = tmp_path / "cli"
    rc = main(
        [
            "records",
            f"inputs={tmp_path / 'a.txt'}",
            f"tokenizer={tok_dir}",
            f"out_dir={out}",
            "max_length=16",
            "dev_fraction=0",
        ]
    )
    assert rc == 0 and (out / "manifest.json").is_file() and (out / "train" / "part-00000.index").is_file()
    assert main(["records", f"inputs={tmp_path / 'a.txt'}", f"tokenizer={tmp_path}", f"out_dir={out}"]) == 2
    assert "hint:" in capsys.readouterr().err


def test_concurrent_builds_in_threads_do_not_share_settings(tmp_path, demo_data_dir, tiny_tokenizer_dir):
    """The pipeline builds lm and chat records at the same time in one process: each build must keep
    its own format settings (a module-global worker state once mixed them up)."""
    from concurrent.futures import ThreadPoolExecutor

    from minima.core.config import RecordsConfig
    from minima.stages.records import run

    def build(fmt, path, name):
        cfg = RecordsConfig(
            inputs=str(path),
            tokenizer=str(tiny_tokenizer_dir),
            format=fmt,
            max_length=64,
            out_dir=str(tmp_path / name),
            dev_fraction=0.1,
            chunk_size=16,
        )
        return run(cfg)

    def data_bytes(art) -> dict:
        return {
            p.relative_to(art.path).as_posix(): p.read_bytes()
            for p in sorted(art.path.rglob("*"))
            if p.suffix in (".tfrecord", ".index")
        }

    serial = {
        "lm": data_bytes(build("lm", demo_data_dir / "text/pretrain_en.txt", "lm_serial")),
        "chat": data_bytes(build("chat", demo_data_dir / "chat/demo_chat.json", "chat_serial")),
    }
    assert serial["lm"] and serial["chat"] and serial["lm"] != serial["chat"]
    for i in range(2):
        with ThreadPoolExecutor(2) as ex:
            lm = ex.submit(build, "lm", demo_data_dir / "text/pretrain_en.txt", f"lm{i}")
            chat = ex.submit(build, "chat", demo_data_dir / "chat/demo_chat.json", f"chat{i}")
            a, b = lm.result(), chat.result()
        assert a.manifest["metrics"]["format"] == "lm" and b.manifest["metrics"]["format"] == "chat"
        # byte for byte what each build writes alone
        assert data_bytes(a) == serial["lm"] and data_bytes(b) == serial["chat"]
