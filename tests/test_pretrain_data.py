"""The pretraining pipeline packs BOS-aligned rows best-fit and resumes exactly from its JSON state."""
import json
import random

import numpy as np
import pytest

from fixtures_tok import ByteTokenizer
from jaxchat.data import pretrain, tiny_corpus
from jaxchat.data.datasets import shard_name
from jaxchat.data.pretrain import _DocBuffer

import pyarrow as pa
import pyarrow.parquet as pq

B, T = 4, 64
KW = dict(batch_size=B, seq_len=T, buffer_docs=24, tokenizer_batch=8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """4 shards x 3 row groups of 16 small docs: an epoch is ~35 batches, so tests cross epochs quickly."""
    d = tmp_path_factory.mktemp("shards")
    r = random.Random(0)
    paths = []
    for i in range(4):
        docs = [tiny_corpus.document(r)[: r.choice((40, 120, 400, 2000))] for _ in range(48)]
        path = d / shard_name(i)
        pq.write_table(pa.table({"text": docs}), path, row_group_size=16, compression="zstd")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


def take(it, n):
    return [next(it) for _ in range(n)]


def same(batches_a, batches_b):
    return len(batches_a) == len(batches_b) and all(
        np.array_equal(a["inputs"], b["inputs"]) and np.array_equal(a["targets"], b["targets"])
        for a, b in zip(batches_a, batches_b))


def all_docs(paths, tok):
    return [bytes(tok.encode(t)) for p in paths for t in pq.read_table(p).column("text").to_pylist()]


def test_batches_are_int32_BxT_with_targets_the_next_tokens(corpus, tok):
    for b in take(iter(pretrain.pretrain_dataset(corpus, tok, **KW)), 5):
        assert b["inputs"].shape == b["targets"].shape == (B, T)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])


def test_rows_are_whole_docs_plus_one_cropped_tail_and_start_with_bos(corpus, tok):
    docs = all_docs(corpus, tok)
    for b in take(iter(pretrain.pretrain_dataset(corpus, tok, **KW)), 30):
        rows = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
        for row in rows:
            assert row[0] == tok.bos_id
            starts = np.flatnonzero(row == tok.bos_id).tolist() + [len(row)]
            pieces = [bytes(row[s + 1:e].tolist()) for s, e in zip(starts, starts[1:])]
            # every piece but the last is a whole doc; the last may be a doc's cropped head. No padding anywhere.
            assert all(p in docs for p in pieces[:-1])
            assert any(d.startswith(pieces[-1]) for d in docs)


def test_cropped_fraction_is_counted_and_deterministic(corpus, tok):
    runs = []
    for _ in range(2):
        it = iter(pretrain.pretrain_dataset(corpus, tok, **KW))
        take(it, 40)
        runs.append(it.stats())
    assert runs[0] == runs[1]
    s = runs[0]
    assert s["tokens_packed"] == 40 * B * (T + 1)
    assert 0 < s["cropped_fraction"] < 1
    assert s["cropped_fraction"] == s["tokens_cropped"] / (s["tokens_packed"] + s["tokens_cropped"])


def test_doc_buffer_takes_the_largest_fit_oldest_first_else_the_shortest():
    buf = _DocBuffer()
    for ref, n in [((0, 0), 5), ((0, 1), 9), ((0, 2), 7), ((1, 0), 9), ((1, 1), 3)]:
        buf.add(ref, list(range(n)))
    assert len(buf.pop_largest_fitting(10)) == 9 and buf.refs_by_row_group() == [[0, [0, 2]], [1, [0, 1]]]
    assert len(buf.pop_largest_fitting(8)) == 7
    assert buf.pop_largest_fitting(2) is None
    assert len(buf.pop_shortest()) == 3 and buf.refs_by_row_group() == [[0, [0]], [1, [0]]]


@pytest.mark.parametrize("k", [0, 7, 130])  # 130 batches is a few epochs in (~35 batches each)
def test_resume_from_json_state_continues_with_the_exact_next_batches(corpus, tok, k):
    straight = iter(pretrain.pretrain_dataset(corpus, tok, **KW))
    take(straight, k)
    state = json.loads(json.dumps(straight.get_state()))
    expected = take(straight, 25)
    resumed = iter(pretrain.pretrain_dataset(corpus, tok, **KW))
    resumed.set_state(state)
    assert same(take(resumed, 25), expected)
    assert resumed.stats() == straight.stats()


def test_resume_across_the_epoch_boundary(corpus, tok):
    it = iter(pretrain.pretrain_dataset(corpus, tok, **KW))
    states, batches = [], []
    while it.epoch == 1:
        states.append(json.loads(json.dumps(it.get_state())))
        batches.append(next(it))
    batches += take(it, 5)
    assert it.get_state()["epoch"] == 2
    k = len(states) - 3  # a few batches before the boundary, so the next 8 cross it
    resumed = iter(pretrain.pretrain_dataset(corpus, tok, **KW))
    resumed.set_state(states[k])
    assert same(take(resumed, 8), batches[k:k + 8]) and resumed.epoch == 2


def test_two_processes_read_disjoint_row_groups_and_each_resumes_exactly(corpus, tok):
    refs = pretrain.row_group_refs(corpus)
    mine = [list(pretrain.process_row_groups(corpus, p, 2)) for p in range(2)]
    assert mine[0] == [pretrain.read_row_group(*r) for r in refs[0::2]]
    assert mine[1] == [pretrain.read_row_group(*r) for r in refs[1::2]]
    for p in range(2):
        straight = iter(pretrain.pretrain_dataset(corpus, tok, process_index=p, process_count=2, **KW))
        take(straight, 60)  # a few epochs of this process's 6 row groups (~16 batches each)
        state = json.loads(json.dumps(straight.get_state()))
        resumed = iter(pretrain.pretrain_dataset(corpus, tok, process_index=p, process_count=2, **KW))
        resumed.set_state(state)
        assert same(take(resumed, 10), take(straight, 10))
    first = [next(iter(pretrain.pretrain_dataset(corpus, tok, process_index=p, process_count=2, **KW))) for p in range(2)]
    assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])


def test_state_from_other_settings_is_rejected_with_the_reason(corpus, tok):
    state = iter(pretrain.pretrain_dataset(corpus, tok, **KW)).get_state()
    other = iter(pretrain.pretrain_dataset(corpus, tok, **{**KW, "seq_len": 32}))
    with pytest.raises(ValueError, match="seq_len: saved 64, now 32"):
        other.set_state(state)


def test_val_batches_are_one_deterministic_finite_pass(corpus, tok):
    a, b = list(pretrain.val_batches(corpus[-1], tok, B, T, buffer_docs=24)), list(pretrain.val_batches(corpus[-1], tok, B, T, buffer_docs=24))
    assert len(a) > 3 and same(a, b)
    assert all(x["inputs"].shape == (B, T) for x in a)
    total = sum(len(d) for d in all_docs(corpus[-1:], tok))
    assert len(a) * B * (T + 1) <= total  # a single pass: never more tokens than the shard holds


def test_a_process_without_row_groups_is_an_error(corpus):
    with pytest.raises(ValueError, match="gets no row groups"):
        pretrain.process_row_groups(corpus[:1], process_index=3, process_count=4)


def test_resume_is_exact_through_a_grain_thread_prefetch(corpus, tok):
    """The trainer may overlap tokenization with the step by prefetching; the saved state must stay exact."""
    import grain

    def make():
        return iter(grain.experimental.ThreadPrefetchIterDataset(pretrain.pretrain_dataset(corpus, tok, **KW), prefetch_buffer_size=3))

    straight, resumed = make(), make()
    try:
        take(straight, 9)
        resumed.set_state(json.loads(json.dumps(straight.get_state())))
        assert same(take(resumed, 6), take(straight, 6))
    finally:
        straight.close()
        resumed.close()
