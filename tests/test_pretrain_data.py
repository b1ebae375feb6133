"""The pretraining pipeline packs rows by stream or best-fit, resumes exactly from its JSON state, and measures
how many tokens the shards hold against a run's horizon before base training starts."""
import json
import math
import random

import numpy as np
import pytest

from fixtures_tok import ByteTokenizer
from jaxchat import config as C
from jaxchat.data import pretrain, tiny_corpus
from jaxchat.data.datasets import shard_name
from jaxchat.data.pretrain import _DocBuffer

import pyarrow as pa
import pyarrow.parquet as pq

B, T = 4, 64
KW = dict(batch_size=B, seq_len=T, buffer_docs=24, tokenizer_batch=8, packing="bestfit")
PACKINGS = pretrain.PACKINGS


def kw(packing):
    return {**KW, "packing": packing}


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


@pytest.mark.parametrize("packing", PACKINGS)
def test_batches_are_int32_BxT_with_targets_the_next_tokens(corpus, tok, packing):
    for b in take(iter(pretrain.pretrain_dataset(corpus, tok, **kw(packing))), 5):
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


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("k", [0, 7, 130])  # 130 batches is a few epochs in for best-fit (~35 batches each)
def test_resume_from_json_state_continues_with_the_exact_next_batches(corpus, tok, k, packing):
    straight = iter(pretrain.pretrain_dataset(corpus, tok, **kw(packing)))
    take(straight, k)
    state = json.loads(json.dumps(straight.get_state()))
    expected = take(straight, 25)
    resumed = iter(pretrain.pretrain_dataset(corpus, tok, **kw(packing)))
    resumed.set_state(state)
    assert same(take(resumed, 25), expected)
    assert resumed.stats() == straight.stats()


@pytest.mark.parametrize("packing", PACKINGS)
def test_resume_across_the_epoch_boundary(corpus, tok, packing):
    it = iter(pretrain.pretrain_dataset(corpus, tok, **kw(packing)))
    states, batches = [], []
    while it.epoch == 1:
        states.append(json.loads(json.dumps(it.get_state())))
        batches.append(next(it))
    batches += take(it, 5)
    assert it.get_state()["epoch"] == 2
    k = len(states) - 3  # a few batches before the boundary, so the next 8 cross it
    resumed = iter(pretrain.pretrain_dataset(corpus, tok, **kw(packing)))
    resumed.set_state(states[k])
    assert same(take(resumed, 8), batches[k:k + 8]) and resumed.epoch == 2


@pytest.mark.parametrize("packing", PACKINGS)
def test_two_processes_read_disjoint_row_groups_and_each_resumes_exactly(corpus, tok, packing):
    refs = pretrain.row_group_refs(corpus)
    mine = [list(pretrain.process_row_groups(corpus, p, 2)) for p in range(2)]
    assert mine[0] == [pretrain.read_row_group(*r) for r in refs[0::2]]
    assert mine[1] == [pretrain.read_row_group(*r) for r in refs[1::2]]
    for p in range(2):
        straight = iter(pretrain.pretrain_dataset(corpus, tok, process_index=p, process_count=2, **kw(packing)))
        take(straight, 60)  # a few epochs of this process's 6 row groups for best-fit (~16 batches each)
        state = json.loads(json.dumps(straight.get_state()))
        resumed = iter(pretrain.pretrain_dataset(corpus, tok, process_index=p, process_count=2, **kw(packing)))
        resumed.set_state(state)
        assert same(take(resumed, 10), take(straight, 10))
    first = [next(iter(pretrain.pretrain_dataset(corpus, tok, process_index=p, process_count=2, **kw(packing))))
             for p in range(2)]
    assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])


def test_state_from_other_settings_is_rejected_with_the_reason(corpus, tok):
    state = iter(pretrain.pretrain_dataset(corpus, tok, **KW)).get_state()
    other = iter(pretrain.pretrain_dataset(corpus, tok, **{**KW, "seq_len": 32}))
    with pytest.raises(ValueError, match="seq_len: saved 64, now 32"):
        other.set_state(state)


@pytest.mark.parametrize("packing", PACKINGS)
def test_val_batches_are_one_deterministic_finite_pass(corpus, tok, packing):
    a, b = (list(pretrain.val_batches(corpus[-1], tok, B, T, buffer_docs=24, packing=packing)) for _ in range(2))
    assert len(a) > 3 and same(a, b)
    assert all(x["inputs"].shape == (B, T) for x in a)
    total = sum(len(d) + 1 for d in all_docs(corpus[-1:], tok))  # + BOS
    per_batch = B * T + 1 if packing == "stream" else B * (T + 1)
    assert len(a) * per_batch <= total  # a single pass: never more tokens than the shard holds


def test_a_process_without_row_groups_is_an_error(corpus):
    with pytest.raises(ValueError, match="gets no row groups"):
        pretrain.process_row_groups(corpus[:1], process_index=3, process_count=4)


@pytest.mark.parametrize("packing", PACKINGS)
def test_resume_is_exact_through_a_grain_thread_prefetch(corpus, tok, packing):
    """The trainer may overlap tokenization with the step by prefetching; the saved state must stay exact."""
    import grain

    def make():
        return iter(grain.experimental.ThreadPrefetchIterDataset(pretrain.pretrain_dataset(corpus, tok, **kw(packing)),
                                                                 prefetch_buffer_size=3))

    straight, resumed = make(), make()
    try:
        take(straight, 9)
        resumed.set_state(json.loads(json.dumps(straight.get_state())))
        assert same(take(resumed, 6), take(straight, 6))
    finally:
        straight.close()
        resumed.close()


# -- stream packing (the October loader) -------------------------------------------------------------------------------


def bos_stream(paths, tok, process_index=0, process_count=1):
    """Every doc of this process's row groups, BOS first, joined in reading order: one epoch of the token stream."""
    stream = []
    for ref in pretrain.row_group_refs(paths)[process_index::process_count]:
        for doc in pretrain.read_row_group(*ref):
            stream += tok.encode(doc, prepend=tok.bos_id)
    return np.array(stream, np.int32)


def test_stream_batches_are_consecutive_slices_of_the_bos_joined_stream(corpus, tok):
    one_epoch = bos_stream(corpus, tok)
    stream = np.concatenate([one_epoch] * 3)
    n = B * T + 1  # each batch pops B*T+1 tokens, as the reference's deque loader
    it = iter(pretrain.pretrain_dataset(corpus, tok, **kw("stream")))
    batches = len(one_epoch) // n + 5  # past the epoch boundary: the stream flows on into epoch 2
    for k in range(batches):
        b = next(it)
        buf = stream[k * n:(k + 1) * n]
        np.testing.assert_array_equal(b["inputs"].reshape(-1), buf[:-1])
        np.testing.assert_array_equal(b["targets"].reshape(-1), buf[1:])
    assert it.epoch == 2
    rows_starting_mid_doc = sum(r[0] != tok.bos_id for r in b["inputs"])
    assert rows_starting_mid_doc > 0  # rows are cut from the stream, not aligned to documents
    s = it.stats()
    assert s["tokens_cropped"] == 0 and s["cropped_fraction"] == 0 and s["tokens_packed"] == batches * n


def test_stream_resume_mid_document_of_a_second_process(corpus, tok):
    """Process 1 of 2 reads its own slice of the stream; a state taken mid-document resumes exactly."""
    stream = bos_stream(corpus, tok, 1, 2)
    args = dict(process_index=1, process_count=2, **kw("stream"))
    straight = iter(pretrain.pretrain_dataset(corpus, tok, **args))
    first = take(straight, 9)
    np.testing.assert_array_equal(np.concatenate([b["inputs"].reshape(-1) for b in first])[:B * T], stream[:B * T])
    state = json.loads(json.dumps(straight.get_state()))
    assert state["offset"] > 0 and state["config"]["packing"] == "stream"  # the next doc was cut by the last batch
    resumed = iter(pretrain.pretrain_dataset(corpus, tok, **args))
    resumed.set_state(state)
    assert same(take(resumed, 12), take(straight, 12)) and resumed.stats() == straight.stats()


def test_a_state_of_the_other_packing_is_refused_and_old_states_read_as_bestfit(corpus, tok):
    bestfit = iter(pretrain.pretrain_dataset(corpus, tok, **kw("bestfit")))
    take(bestfit, 3)
    state = json.loads(json.dumps(bestfit.get_state()))
    with pytest.raises(ValueError, match="packing: saved bestfit, now stream"):
        iter(pretrain.pretrain_dataset(corpus, tok, **kw("stream"))).set_state(state)
    del state["config"]["packing"]  # saved before the packing choice existed: those pipelines were best-fit
    resumed = iter(pretrain.pretrain_dataset(corpus, tok, **kw("bestfit")))
    resumed.set_state(state)
    assert same(take(resumed, 4), take(bestfit, 4))
    with pytest.raises(ValueError, match="packing must be one of stream, bestfit"):
        pretrain.pretrain_dataset(corpus, tok, **kw("greedy"))


# -- the data horizon --------------------------------------------------------------------------------------------------


def test_data_horizon_counts_every_token_for_stream_and_measures_bestfit_crop(corpus, tok):
    total = len(bos_stream(corpus, tok))
    h = pretrain.data_horizon(corpus, tok, T, "stream", horizon_tokens=total // 2, sample_docs=10_000)
    assert h.sample_docs == 4 * 48 and h.docs == 4 * 48  # the whole corpus was the sample
    assert h.crop_fraction == 0 and round(h.tokens_available) == total and h.epochs == pytest.approx(0.5, abs=1e-3)
    assert h.shards_needed == math.ceil(total / 2 * 1.1 / (total / 4))
    b = pretrain.data_horizon(corpus, tok, T, "bestfit", horizon_tokens=total // 2, sample_docs=10_000, buffer_docs=24)
    assert 0.05 < b.crop_fraction < 0.95  # docs of up to 2,000 bytes into rows of 65: much is cropped
    assert b.tokens_available == pytest.approx(total * (1 - b.crop_fraction)) and b.epochs > h.epochs
    assert json.loads(json.dumps(b.record()))["epochs"] == b.epochs


def test_bestfit_crop_estimate_reaches_the_long_run_crop_of_the_real_pipeline(corpus, tok):
    """The sample estimate (two passes over the docs) against the pipeline's own crop over many epochs."""
    docs = [tok.encode(d, prepend=tok.bos_id) for p in corpus for d in pq.read_table(p).column("text").to_pylist()]
    estimate = pretrain.crop_fraction(docs, "bestfit", T, buffer_docs=24)
    it = iter(pretrain.pretrain_dataset(corpus, tok, **kw("bestfit")))
    while it.epoch < 4:
        next(it)
    s0 = it.stats()
    while it.epoch < 8:
        next(it)
    s1 = it.stats()
    cropped, packed = s1["tokens_cropped"] - s0["tokens_cropped"], s1["tokens_packed"] - s0["tokens_packed"]
    assert estimate == pytest.approx(cropped / (cropped + packed), abs=0.05)


@pytest.fixture()
def horizon_setup(corpus, tok, monkeypatch, tmp_path):
    monkeypatch.setenv("JAXCHAT_HOME", str(tmp_path))
    config = C.load_config_file("configs/tiny.py")
    config = C.apply_overrides(config, {"dataset": "fineweb-edu", "packing": "stream", "allow_repeat": "False",
                                        "sequence_len": str(T), "device_batch_size": "4", "num_iterations": "200"})
    total = len(bos_stream(corpus, tok))
    return config, C.derive(config, 1), total


def test_base_refuses_a_horizon_that_repeats_data_naming_the_shards_and_the_command(corpus, tok, horizon_setup):
    from jaxchat import stages

    config, derived, total = horizon_setup
    assert derived.total_tokens == 200 * 4 * T > total  # the horizon is more than the 4 shards hold
    need = math.ceil(derived.total_tokens * 1.1 / (total / 4))
    with pytest.raises(C.ConfigError) as e:
        stages.check_data_horizon(config, corpus, tok, derived, log=lambda *_: None)
    message = str(e.value)
    assert f"needs {need} train shards" in message and f"`python -m jaxchat.data.download -n {need}`" in message
    assert "would repeat data" in message and "--config.allow_repeat=True" in message


def test_allow_repeat_lets_the_repeating_horizon_run_and_the_record_says_so(corpus, tok, horizon_setup):
    from jaxchat import stages

    config, derived, total = horizon_setup
    config.allow_repeat = True
    logged = []
    record = stages.check_data_horizon(config, corpus, tok, derived, log=logged.append)["data_horizon"]
    assert record["epochs"] == pytest.approx(derived.total_tokens / total, rel=1e-6) and record["epochs"] > 1
    assert record["packing"] == "stream" and record["crop_fraction"] == 0 and record["train_shards"] == 4
    assert any("allow_repeat is set" in line for line in logged)
    config.num_iterations = 10  # well inside the shards: no refusal, nothing to allow
    config.allow_repeat = False
    fits = stages.check_data_horizon(config, corpus, tok, C.derive(config, 1), log=lambda *_: None)["data_horizon"]
    assert fits["epochs"] < 1
