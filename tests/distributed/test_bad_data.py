"""Bad data through ``launch/train.py`` under ``torchrun`` with 2 gloo ranks: one ``error:`` line, exit code 2.

Each case is a corpus (or tokenizer) a user can get wrong: malformed JSON, an empty file, a
wrong text column, non-string text, invalid UTF-8, a corpus too small for one window or for one
global batch, a directory without a readable corpus file, a tokenizer file that is not a
SentencePiece model. Every rank must end with exit code 2, the message (naming the file, and
the line where the reader can tell) must appear once, and no traceback may come from lctrain's
processes (torchrun's own ``ChildFailedError`` summary is the launcher's). A last test checks
that a run after a failed read, with the file fixed, rebuilds its caches and trains.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, tiny_overrides

pytestmark = pytest.mark.distributed

TRAIN = str(REPO / "launch" / "train.py")
TEXT = ("The quick brown fox jumps over the lazy dog while the river runs past the old mill. " * 12).strip()


def _torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "--monitor-interval=0.2", TRAIN, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _args(tmp_path: Path, data_path: Path | str, **extra) -> list[str]:
    base = {"train.max_steps": 1, "train.eval_every": 0, "train.checkpoint_every": 0}
    return tiny_overrides(tmp_path / "run", Path(data_path), tmp_path / "cache", **{**base, **extra})


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _assert_clean_exit_2(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Both ranks exited 2, one ``error:`` line holding ``fragments``, no traceback from an lctrain process."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-4000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-4000:]
    for frag in fragments:
        assert frag in errors[0], (frag, errors[0])
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", out)  # torchrun's summary: one entry per failed rank
    assert codes and set(codes) == {"2"}, out[-4000:]
    # the one traceback allowed is torchrun's own (ChildFailedError, in torch's launcher code)
    assert out.count("Traceback (most recent call last)") == out.count("ChildFailedError:") <= 1, out[-4000:]
    frames = [line for line in out.splitlines() if line.lstrip().startswith('File "')]
    assert not [f for f in frames if "lctrain" in f or "launch/train.py" in f], out[-4000:]
    assert "Connection closed by peer" not in out and "DistBackendError" not in out, out[-4000:]
    return errors[0]


def _good_rows(n: int) -> list[dict]:
    return [{"text": f"Document {i}. {TEXT}"} for i in range(n)]


def test_malformed_json_line_names_the_line(tmp_path):
    rows = _good_rows(6)
    rows.insert(3, '{"text": "a line cut short')  # line 4
    corpus = _jsonl(tmp_path / "bad.jsonl", rows)
    _assert_clean_exit_2(_torchrun(_args(tmp_path, corpus)), str(corpus), "line 4", "not valid JSON")


def test_empty_jsonl_says_empty(tmp_path):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_bytes(b"")
    _assert_clean_exit_2(_torchrun(_args(tmp_path, corpus)), str(corpus), "is empty")


def test_text_column_under_another_name(tmp_path):
    corpus = _jsonl(tmp_path / "body.jsonl", [{"body": r["text"]} for r in _good_rows(4)])
    _assert_clean_exit_2(_torchrun(_args(tmp_path, corpus)), str(corpus), "no column 'text'", "body",
                         "data.text_key")


def test_integer_text_names_row_and_line(tmp_path):
    corpus = _jsonl(tmp_path / "ints.jsonl", [{"text": i} for i in range(4)])
    _assert_clean_exit_2(_torchrun(_args(tmp_path, corpus)), str(corpus), "must hold strings", "row 0", "line 1",
                         "int")


def test_invalid_utf8_names_the_byte_offset(tmp_path):
    corpus = tmp_path / "latin1.txt"
    head = (TEXT + "\n").encode()
    corpus.write_bytes(head + "caf\xe9 cr\xe8me\n".encode("latin-1") + (TEXT + "\n").encode())
    _assert_clean_exit_2(_torchrun(_args(tmp_path, corpus)), str(corpus), "invalid UTF-8",
                         f"byte offset {len(head) + 3}", "line 2")


def test_corpus_shorter_than_one_window(tmp_path):
    corpus = _jsonl(tmp_path / "short.jsonl", [{"text": "Too short."}])
    _assert_clean_exit_2(_torchrun(_args(tmp_path, corpus)), str(corpus), "fewer than one window")


def test_fewer_windows_than_one_global_batch(tmp_path):
    corpus = _jsonl(tmp_path / "one.jsonl", [{"text": TEXT * 2}])  # one document: a few windows of 64
    msg = _assert_clean_exit_2(_torchrun(_args(tmp_path, corpus, **{"data.val_fraction": 0.0})), str(corpus),
                               "fewer than one global batch", "train.global_batch_size=8")
    windows = int(re.search(r"has (\d+) windows", msg).group(1))
    assert 0 < windows < 8, msg


def test_directory_without_a_readable_file(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "part-0.jsonl").write_bytes(b"")
    (shards / "notes.csv").write_text("a,b\n")
    _assert_clean_exit_2(_torchrun(_args(tmp_path, shards)), str(shards), "no readable corpus file",
                         "part-0.jsonl (empty)")


def test_tokenizer_file_that_is_not_sentencepiece(tmp_path):
    corpus = _jsonl(tmp_path / "ok.jsonl", _good_rows(4))
    bogus = tmp_path / "tok.model"
    bogus.write_text("this is not a sentencepiece model\n")
    _assert_clean_exit_2(_torchrun(_args(tmp_path, corpus, **{"data.tokenizer": bogus})), str(bogus),
                         "not a SentencePiece model")


def test_run_after_a_failed_read_rebuilds_and_trains(small_corpus, tmp_path):
    lines = small_corpus.read_text(encoding="utf-8").splitlines()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join([*lines[:5], lines[5][:-40], *lines[6:]]) + "\n", encoding="utf-8")
    args = _args(tmp_path, corpus, **{"train.max_steps": 2})
    _assert_clean_exit_2(_torchrun(args), str(corpus), "line 6")
    cache = tmp_path / "cache"
    trusted = [p for p in cache.rglob("*") if p.name.startswith(("prepared_", "tokenizer_")) or p.suffix == ".npy"]
    assert not trusted, trusted
    assert not list(cache.rglob("dataset_info.json")), "datasets kept a dataset it could not finish"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")  # the fix
    proc = _torchrun(args, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and len(summary["losses"]) == 2
    assert list(cache.glob("prepared_*.json")) and list(cache.glob("tokenizer_*.model"))
