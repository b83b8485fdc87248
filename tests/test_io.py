"""minima.core.io: the one file reader. Rows against json / csv / pandas reading the same files, and
every error names the file and the line a person would open."""

import csv
import json
import re

import pytest

from minima.core import io
from minima.core.errors import DataError, InputError


def test_jsonl_rows_lines_and_errors(tmp_path):
    rows = [{"a": 1}, {"b": "中文"}, [1, 2]]
    f = tmp_path / "x.jsonl"
    f.write_text("\ufeff" + json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\r\n" + json.dumps(rows[2]) + "\n")
    assert io.read_rows(f) == [(1, rows[0]), (3, rows[1]), (4, rows[2])]

    f.write_text('{"a": 1}\n{"a": 2}\n{"a": oops}\n{"a": 4}\n')
    with pytest.raises(DataError, match=re.escape(f"{f}:3: malformed JSON")):
        io.read_rows(f)
    seen = []
    kept = list(io.iter_rows(f, on_error=lambda where, reason, fix: seen.append(where)))
    assert [n for n, _ in kept] == [1, 2, 4] and seen == [f"{f}:3"]


def test_undecodable_bytes_name_the_line(tmp_path):
    f = tmp_path / "x.txt"
    f.write_bytes(b"ok\r\nstill ok\nbad \xff byte\n")
    with pytest.raises(DataError, match=re.escape(f"{f}:3: not UTF-8")):
        io.read_rows(f)
    with pytest.raises(DataError, match=re.escape(f"{f}:3: not UTF-8")):
        io.read_text(f)
    g = tmp_path / "x.csv"
    g.write_bytes(b"a,b\n1,2\n3,\xfe\n")
    with pytest.raises(DataError, match=re.escape(f"{g}:3: not UTF-8")):
        io.read_rows(g)


def test_txt_lines_keep_blank_lines_and_drop_line_breaks(tmp_path):
    f = tmp_path / "x.txt"
    f.write_bytes("\ufeffone\r\n\ntwo\nthree".encode())
    assert io.read_rows(f) == [(1, "one"), (2, ""), (3, "two"), (4, "three")]


def test_json_array_numbers_records_and_knows_their_lines(tmp_path):
    items = [{"q": "a"}, {"q": "b", "more": [1, 2]}, {"q": "c"}]
    f = tmp_path / "x.json"
    text = json.dumps(items, indent=1)
    f.write_text(text)
    assert io.read_rows(f) == [(i, r) for i, r in enumerate(items, 1)]
    starts = [i + 1 for i, x in enumerate(text.splitlines()) if x == " {"]  # where each item opens, by hand
    assert [line for _, line, _ in io.iter_json_array(f)] == starts

    broken = text.replace('"b"', "b")
    f.write_text(broken)
    line = 1 + broken[: broken.index("b,")].count("\n")
    with pytest.raises(DataError, match=re.escape(f"{f}:{line}: malformed JSON")):
        io.read_rows(f)

    f.write_text("")
    assert io.read_rows(f) == []


def test_json_lines_under_a_json_name_and_a_single_object(tmp_path):
    f = tmp_path / "belle.json"
    f.write_text('{"q": 1}\n{"q": 2}\n')
    assert io.is_json_lines(f) and io.read_rows(f) == [(1, {"q": 1}), (2, {"q": 2})]
    f.write_text('{\n  "q": 1\n}\n')
    assert not io.is_json_lines(f) and io.read_rows(f) == [(1, {"q": 1})]


def test_csv_rows_start_lines_and_errors(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text('text,id\n"two\nlines",1\n\nplain,2\n"a, b",3\n', newline="")
    with open(f, newline="") as fh:
        ref = list(csv.DictReader(fh))
    rows = io.read_rows(f)
    assert [r for _, r in rows] == ref
    assert [n for n, _ in rows] == [2, 5, 6]  # the line each row starts on (counted by hand)
    assert [r for _, r in io.iter_csv(f, header=False)][0] == ["text", "id"]

    f.write_text("text,id\nok,1\ntoo,many,fields\n")
    with pytest.raises(DataError, match=re.escape(f"{f}:3: 3 fields but the header has 2")):
        io.read_rows(f)
    f.write_text('text,id\nok,1\n"open quote,2\n')
    with pytest.raises(DataError, match=re.escape(f"{f}:3: malformed CSV")):
        io.read_rows(f)


def test_parquet_rows_are_plain_python(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    df = pd.DataFrame({"text": ["a", "b"], "n": [1, 2], "turns": [["x", "y"], ["z"]]})
    f = tmp_path / "x.parquet"
    df.to_parquet(f)
    rows = io.read_rows(f)
    assert rows == [(1, {"text": "a", "n": 1, "turns": ["x", "y"]}), (2, {"text": "b", "n": 2, "turns": ["z"]})]
    assert type(rows[0][1]["n"]) is int and type(rows[0][1]["turns"]) is list

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read parquet"):
        io.read_rows(bad)


def test_unsupported_suffix_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"unsupported file type \.xml"):
        io.read_rows(tmp_path / "x.xml")
