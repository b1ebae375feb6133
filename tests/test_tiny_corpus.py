"""The embedded tiny corpus is written in the FineWeb shard format and is deterministic; shard listing errors name the fix."""
import hashlib
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxchat.data import shards, tiny_corpus
from jaxchat.data.datasets import get_dataset, shard_name


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_HOME", str(tmp_path))
    return tmp_path


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shards_use_the_fineweb_format(tmp_path):
    written = tiny_corpus.generate(tmp_path, num_shards=2, chars_per_shard=600_000)
    assert [p.name for p in written] == ["shard_00000.parquet", "shard_00001.parquet"]
    for path in written:
        f = pq.ParquetFile(path)
        assert f.schema_arrow == pa.schema([("text", pa.string())])
        meta = f.metadata
        assert meta.num_rows % 1024 == 0 and meta.num_row_groups >= 2  # reference §4.1: row groups of 1024 docs
        for rg in range(meta.num_row_groups):
            col = meta.row_group(rg).column(0)
            assert meta.row_group(rg).num_rows == 1024
            assert col.compression == "ZSTD"
            assert not col.is_stats_set
        texts = f.read().column("text").to_pylist()
        assert sum(map(len, texts)) >= 600_000 and all(texts)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    a = tiny_corpus.generate(tmp_path / "a", seed=3, num_shards=2, chars_per_shard=1000)
    b = tiny_corpus.generate(tmp_path / "b", seed=3, num_shards=2, chars_per_shard=1000)
    c = tiny_corpus.generate(tmp_path / "c", seed=4, num_shards=2, chars_per_shard=1000)
    assert [_sha(p) for p in a] == [_sha(p) for p in b]
    assert _sha(a[0]) != _sha(c[0])
    assert _sha(a[0]) != _sha(a[1])  # shards are not copies of each other


def test_reference_sample_prompts_are_answered_in_the_training_shards():
    text = "\n".join(d for i in range(7) for d in tiny_corpus.shard_documents(0, i, 900_000))
    for answer in ("The capital of France is Paris.", "The chemical symbol of gold is Au.",
                   "If yesterday was Friday, then tomorrow will be Sunday.", "The opposite of hot is cold.",
                   "The planets of the solar system are: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus, and Neptune.",
                   "If 5*x + 3 = 13, then x is 2.", "The word cat is spelled c-a-t."):
        assert text.count(answer) >= 20, answer  # seen often enough to be learnable


def test_written_out_arithmetic_is_correct():
    text = "\n".join(tiny_corpus.shard_documents(0, 0, 100_000))
    sums = re.findall(r"(\d+) plus (\d+) is (\d+)\.", text)
    products = re.findall(r"(\d+) times (\d+) is (\d+)\.", text)
    solved = re.findall(r"If (\d+)\*x \+ (\d+) = (\d+), then x is (\d+)\.", text)
    assert len(sums) > 50 and len(products) > 50 and len(solved) > 20
    assert all(int(a) + int(b) == int(c) for a, b, c in sums)
    assert all(int(a) * int(b) == int(c) for a, b, c in products)
    assert all(int(a) * int(x) + int(b) == int(c) for a, b, c, x in solved)


def test_ensure_tiny_corpus_generates_once_then_is_a_no_op(home):
    first = tiny_corpus.ensure_tiny_corpus()
    assert len(first) == get_dataset("tiny").num_shards
    stamps = [p.stat().st_mtime_ns for p in first]
    assert tiny_corpus.ensure_tiny_corpus() == first
    assert [p.stat().st_mtime_ns for p in first] == stamps
    train, val = shards.list_shards("tiny")
    assert val.name == shard_name(7) and [p.name for p in train] == [shard_name(i) for i in range(7)]


def test_ensure_tiny_corpus_completes_a_partial_corpus(home):
    out = home / "data" / "tiny"
    tiny_corpus.generate(out, num_shards=3, chars_per_shard=1000)
    assert len(tiny_corpus.ensure_tiny_corpus()) == 8 and (out / shard_name(7)).exists()


def test_missing_shards_name_the_command_that_fetches_them(home):
    with pytest.raises(FileNotFoundError, match="python -m jaxchat.data.tiny_corpus"):
        shards.list_shards("tiny")
    with pytest.raises(FileNotFoundError, match="python -m jaxchat.data.download -n 8 --dataset fineweb-edu"):
        shards.list_shards("fineweb-edu")


def test_missing_val_shard_is_named(home):
    tiny_corpus.generate(home / "data" / "tiny", num_shards=2, chars_per_shard=1000)
    with pytest.raises(FileNotFoundError, match=r"shard_00007\.parquet is missing"):
        shards.list_shards("tiny")


def test_iter_texts_crops_docs_and_stops_after_max_chars(tmp_path):
    path = tmp_path / shard_name(0)
    tiny_corpus.write_shard(["a" * 50, "b" * 5, "c" * 30, "d" * 10], path)
    assert list(shards.iter_texts([path], doc_cap=20)) == ["a" * 20, "b" * 5, "c" * 20, "d" * 10]
    assert list(shards.iter_texts([path, path], max_chars=60, doc_cap=20)) == ["a" * 20, "b" * 5, "c" * 20, "d" * 10, "a" * 20]
