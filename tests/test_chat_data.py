"""Chat mixtures: deterministic coverage, masks exactly where the reference puts them, exact resume."""
import collections
import json
import random

import numpy as np
import pytest

from fixtures_tok import ByteTokenizer
from jaxchat.data import chat

B, T = 3, 64


def make_task(name, n, seed):
    r = random.Random(seed)
    return [{"messages": [
        {"role": "user", "content": f"{name}{i}? " + "q" * r.randrange(0, 30)},
        {"role": "assistant", "content": f"{name}{i}! " + "a" * r.randrange(0, 60)},
    ]} for i in range(n)]


def tool_task(n):
    return [{"messages": [
        {"role": "user", "content": f"what is {i}+{i}?"},
        {"role": "assistant", "content": [{"type": "text", "text": "let me"},
                                          {"type": "python", "text": f"{i}+{i}"},
                                          {"type": "python_output", "text": str(2 * i)},
                                          {"type": "text", "text": f"it is {2 * i}"}]},
    ]} for i in range(n)]


A, C, TOOLS = make_task("A", 7, 0), make_task("C", 5, 1), tool_task(4)


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


def key(conv):
    return json.dumps(conv, sort_keys=True)


def take(it, n):
    return [next(it) for _ in range(n)]


def same(xs, ys):
    return len(xs) == len(ys) and all(np.array_equal(x["inputs"], y["inputs"]) and np.array_equal(x["targets"], y["targets"])
                                      for x, y in zip(xs, ys))


def expected_targets(ids, mask):
    return [t if m else -1 for t, m in zip(ids[1:], mask[1:])]


def test_every_example_once_per_epoch_and_a_new_order_each_epoch():
    stream = chat.mixture([A, C], seed=1, num_epochs=2)
    assert len(stream) == 24
    epochs = [[key(stream[i]) for i in range(e * 12, (e + 1) * 12)] for e in range(2)]
    everything = sorted(key(c) for c in A + C)
    assert sorted(epochs[0]) == sorted(epochs[1]) == everything
    assert epochs[0] != epochs[1]


def test_listing_a_task_twice_oversamples_it_by_repetition():
    counts = collections.Counter(key(c) for c in chat.mixture([A, A, C], seed=0, num_epochs=1))
    assert all(counts[key(c)] == 2 for c in A) and all(counts[key(c)] == 1 for c in C)
    assert sum(counts.values()) == 19


def test_mixture_order_is_fixed_by_its_seed():
    order = lambda seed: [key(c) for c in chat.mixture([A, C], seed=seed, num_epochs=1)]  # noqa: E731
    assert order(5) == order(5) and order(5) != order(6)


def test_processes_get_disjoint_strides_of_the_same_mixture():
    full = [key(c) for c in chat.mixture([A, C], seed=2, num_epochs=1)]
    parts = [[key(c) for c in chat.mixture([A, C], seed=2, num_epochs=1, process_index=p, process_count=2)] for p in range(2)]
    assert parts[0] == full[0::2] and parts[1] == full[1::2]


def reference_padded_row(tok, conv, T):
    """One row of nanochat V0 chat_sft's collate (§7.2), written out: render with its cap (2048 = T), inputs ids[:-1]
    padded with <|assistant_end|>, targets ids[1:] with -1 where mask[1:] is 0 and on padding."""
    ids, mask = tok.render_conversation(conv, max_tokens=T)
    pad = tok.special_id("<|assistant_end|>")
    inputs = ids[:-1] + [pad] * (T - len(ids) + 1)
    targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])] + [-1] * (T - len(ids) + 1)
    return inputs, targets


def test_padded_mode_is_the_reference_v0_sft_collate_row_for_row(tok):
    convs = list(chat.mixture([A, TOOLS], seed=3, num_epochs=1))
    assert max(len(tok.render_conversation(c, 10_000)[0]) for c in convs) > T + 1  # some are capped
    batches = list(chat.chat_dataset([A, TOOLS], tok, B, T, mode="padded", seed=3, num_epochs=1))
    inputs = np.concatenate([b["inputs"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    for row, conv in enumerate(convs):
        ref_inputs, ref_targets = reference_padded_row(tok, conv, T)
        np.testing.assert_array_equal(inputs[row], ref_inputs)
        np.testing.assert_array_equal(targets[row], ref_targets)
    # the last batch is topped up with empty rows: padding only, nothing supervised
    assert inputs.shape[0] == -(-len(convs) // B) * B
    assert (targets[len(convs):] == -1).all() and (inputs[len(convs):] == tok.special_id("<|assistant_end|>")).all()


def split_packed_row(inputs_row, targets_row, bos, user_start):
    """The conversations in a packed row, as (start, end) spans of the T+1 row; padding is what follows."""
    row = list(inputs_row) + [targets_row[-1] if targets_row[-1] >= 0 else bos]
    starts = [i for i in range(len(row) - 1) if row[i] == bos and row[i + 1] == user_start]
    ends = starts[1:] + [next((i for i in range(starts[-1] + 1, len(row)) if row[i] == bos), len(row))] if starts else []
    return row, list(zip(starts, ends))


def test_packed_mode_places_whole_conversations_and_masks_bos_padding(tok):
    tasks = [A, C, TOOLS]
    rendered = {}
    for c in chat.mixture(tasks, seed=0, num_epochs=1):
        rendered.setdefault(key(c), tok.render_conversation(c, T + 1))
    by_ids = {tuple(ids): (ids, mask) for ids, mask in rendered.values()}
    seen = collections.Counter()
    user_start = tok.special_id("<|user_start|>")
    for b in chat.chat_dataset(tasks, tok, B, T, mode="packed", seed=0, num_epochs=1, buffer_size=8):
        for inputs_row, targets_row in zip(b["inputs"], b["targets"]):
            row, spans = split_packed_row(inputs_row, targets_row, tok.bos_id, user_start)
            ids_row, mask_row = [], []
            for s, e in spans:
                ids, mask = by_ids[tuple(row[s:e])]  # KeyError here = a cropped or corrupted conversation
                ids_row += ids
                mask_row += mask
                seen[tuple(ids)] += 1
            assert spans == [] or spans[0][0] == 0  # rows start with a conversation's BOS
            pad = T + 1 - len(ids_row)
            assert row[len(ids_row):] == [tok.bos_id] * pad
            np.testing.assert_array_equal(targets_row, expected_targets(ids_row + [tok.bos_id] * pad, mask_row + [0] * pad))
    assert seen == collections.Counter(tuple(ids) for ids, _ in (tok.render_conversation(c, T + 1)
                                                                   for c in chat.mixture(tasks, 0, num_epochs=1)))


def test_tool_output_and_user_turns_are_never_targets(tok):
    targets = np.concatenate([b["targets"] for b in chat.chat_dataset([TOOLS], tok, B, T, num_epochs=1)])
    for name in ("<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|output_start|>", "<|output_end|>", "<|bos|>"):
        assert not (targets == tok.special_id(name)).any(), name
    for name in ("<|python_start|>", "<|python_end|>", "<|assistant_end|>"):
        assert (targets == tok.special_id(name)).sum() == len(TOOLS), name


@pytest.mark.parametrize("mode", chat.MODES)
@pytest.mark.parametrize("k", [0, 2, 9])  # 9 batches is past the end of the first epoch in both modes
def test_resume_continues_with_the_exact_next_batches(tok, mode, k):
    make = lambda: iter(chat.chat_dataset([A, C, TOOLS], tok, B, T, mode=mode, seed=7, buffer_size=6))  # noqa: E731
    straight = make()
    take(straight, k)
    state = json.loads(json.dumps(straight.get_state()))
    expected = take(straight, 8)
    resumed = make()
    resumed.set_state(state)
    assert same(take(resumed, 8), expected)
    assert resumed.stats() == straight.stats() and straight.epoch >= (2 if k == 9 else 1)


def test_each_of_two_processes_resumes_exactly(tok):
    for p in range(2):
        make = lambda: iter(chat.chat_dataset([A, C], tok, B, T, seed=1, process_index=p, process_count=2, buffer_size=4))  # noqa: E731
        straight = make()
        take(straight, 3)
        resumed = make()
        resumed.set_state(json.loads(json.dumps(straight.get_state())))
        assert same(take(resumed, 6), take(straight, 6))


def test_progress_counts_conversations_placed_and_an_epoch_ends_at_one(tok):
    it = iter(chat.chat_dataset([A, C], tok, B, T, mode="padded", num_epochs=1))
    next(it)
    assert it.progress == pytest.approx(B / 12) and it.epoch == 1
    batches = 1 + sum(1 for _ in it)
    assert batches == 4 and it.progress == 1.0 and it.epoch == 2


def test_state_from_another_mode_is_rejected(tok):
    state = iter(chat.chat_dataset([A], tok, B, T, mode="padded")).get_state()
    with pytest.raises(ValueError, match="does not match"):
        iter(chat.chat_dataset([A], tok, B, T, mode="packed")).set_state(state)
