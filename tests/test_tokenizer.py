"""Tokenizer: training, round trips, special tokens, token_bytes, streaming decode, chat masks."""
import random

import numpy as np
import pytest

from jaxchat import paths
from jaxchat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, StreamDecoder, Tokenizer

VOCAB = 420

EMOJI_CJK = "Emoji 🙂👍🏽🇰🇷 and CJK 日本語のテキスト、中文字符, 한국어 문장입니다."
SAMPLES = {
    "ascii": "The quick brown fox jumps over the lazy dog. It's 2024, isn't it? Yes -- we'll see!",
    "multiscript": "Ünïcödé: Привет мир, γειά σου κόσμε, مرحبا بالعالم, नमस्ते दुनिया, שלום",
    "emoji_cjk": EMOJI_CJK,
    "code": "def f(x):\n    return {'a': x ** 2, \"b\": [1, 2, 3]}  # comment\n\n\tif x != 0:\r\n        pass\n",
    "whitespace": "  leading\n\n\n   trailing   \t\n",
    "digits": "1234567890 3.14159 -42 1e10 0x1F",
    "empty": "",
}


def make_corpus(n_docs=400, seed=0):
    """Deterministic mixed-script text: enough distinct pairs for a few hundred merges."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "shu", "men", "al", "or", "the", "ing", "ed", "한", "국", "어", "日", "本",
                 "🙂", "ü", "ï", "def", "ж", "λ", "(", ")", "=", "'s"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(600)]
    docs = []
    for _ in range(n_docs):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(20, 80)))
        docs.append(line + f" {rng.randint(0, 9999)}.\n")
    return docs


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(make_corpus(), VOCAB)


# ---- vocabulary ---------------------------------------------------------------------------------

def test_vocab_size_is_exact_and_specials_are_the_last_nine(tok):
    assert tok.vocab_size == VOCAB
    ids = [tok.special_id(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(VOCAB - 9, VOCAB))
    assert tok.bos_id == VOCAB - 9
    assert len(tok.token_bytes) == VOCAB


def test_unknown_special_name_is_a_clear_error(tok):
    with pytest.raises(KeyError, match="known: <\\|bos\\|>"):
        tok.special_id("<|eot|>")


def test_vocab_too_small_or_text_too_short_are_errors():
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train(["abc"], 264)
    with pytest.raises(ValueError, match="give more text or lower vocab_size"):
        Tokenizer.train(["ab ab ab"], 300)


def test_progress_callback_sees_every_char():
    seen = []
    corpus = make_corpus(n_docs=50)
    Tokenizer.train(corpus, 300, progress=lambda chars, seconds: seen.append(chars))
    assert seen and seen[-1] == sum(len(d) for d in corpus)


# ---- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip_is_exact(tok, name):
    text = SAMPLES[name]
    assert tok.decode(tok.encode(text)) == text


def test_random_bytes_round_trip_after_utf8_replacement(tok):
    rng = np.random.default_rng(0)
    for _ in range(20):
        text = rng.integers(0, 256, size=200, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")
        assert tok.decode(tok.encode(text)) == text


def test_regex_pattern_splits_like_python_regex():
    """HF's Oniguruma must honour the possessive quantifiers exactly as `regex` (tiktoken's semantics) does."""
    regex = pytest.importorskip("regex")
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    for text in SAMPLES.values():
        assert [piece for piece, _ in split.pre_tokenize_str(text)] == regex.findall(SPLIT_PATTERN, text)


def test_encode_batch_equals_encode(tok):
    texts = list(SAMPLES.values()) * 3
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, prepend="<|bos|>", append=5) == [tok.encode(t, prepend="<|bos|>", append=5) for t in texts]


def test_tiktoken_over_our_ranks_gives_the_ids_of_the_hf_encoder(tok, monkeypatch):
    """encode_batch uses tiktoken (faster) where it is installed; it must be the same tokenizer, text for text."""
    pytest.importorskip("tiktoken")
    texts = list(SAMPLES.values()) + make_corpus(200, seed=1) + ["a <|bos|> b <|assistant_end|>", " " * 40 + "x" * 300]
    assert tok.fast_encoder() is not None
    fast = tok.encode_batch(texts, prepend="<|bos|>")
    monkeypatch.setenv("JAXCHAT_TOKENIZER", "hf")
    hf_tok = Tokenizer(tok._hf)  # a fresh instance reads the switch
    assert hf_tok.fast_encoder() is None
    assert hf_tok.encode_batch(texts, prepend="<|bos|>") == fast


def test_prepend_and_append_take_names_or_ids(tok):
    body = tok.encode("hello")
    assert tok.encode("hello", prepend="<|bos|>") == [tok.bos_id, *body]
    assert tok.encode("hello", prepend=tok.bos_id, append="<|assistant_end|>") == [tok.bos_id, *body, tok.special_id("<|assistant_end|>")]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode("hello", append=VOCAB)


def test_special_token_text_is_not_parsed(tok):
    text = "a <|bos|> b <|assistant_end|><|python_start|>x"
    ids = tok.encode(text)
    assert not set(ids) & {tok.special_id(n) for n in SPECIAL_TOKENS}
    assert tok.decode(ids) == text
    assert tok.encode_batch([text]) == [ids]


def test_decode_shows_specials_and_rejects_bad_ids(tok):
    assert tok.decode([tok.bos_id, *tok.encode("hi")]) == "<|bos|>hi"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])


def test_save_then_load_gives_identical_ids(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_HOME", str(tmp_path))
    directory = tok.save(paths.tokenizer_dir("tiny"))
    assert (directory / "tokenizer.json").is_file()
    np.testing.assert_array_equal(np.load(directory / "token_bytes.npy"), tok.token_bytes)
    loaded = Tokenizer.load(directory)
    texts = list(SAMPLES.values())
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode_batch(texts) == tok.encode_batch(texts)
    assert [loaded.special_id(n) for n in SPECIAL_TOKENS] == [tok.special_id(n) for n in SPECIAL_TOKENS]


def test_load_missing_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"python train.py --config=configs/d20.py --stage=tokenizer"):
        Tokenizer.load(paths.tokenizer_dir("d20"))  # d20's default tokenizer: configs/d20.py trains it
    with pytest.raises(FileNotFoundError, match=r"--config=<your config> --config.tokenizer=exp2 --stage=tokenizer"):
        Tokenizer.load(paths.tokenizer_dir("exp2"))  # configs/exp2.py does not exist: never name it


# ---- token_bytes --------------------------------------------------------------------------------

def test_token_bytes_sum_to_utf8_length(tok):
    for text in SAMPLES.values():
        ids = tok.encode(text)
        assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_token_bytes_are_raw_bytes_not_decoded_text(tok):
    tb = tok.token_bytes
    assert tb.dtype == np.int32 and tb.shape == (VOCAB,)
    assert (tb[VOCAB - 9:] == 0).all()
    raw = [tok.token_to_bytes(i) for i in range(VOCAB - 9)]
    # All 256 single bytes are tokens, including 0x80-0xFF, which decode to U+FFFD (3 bytes) as str.
    assert sorted(b for b in raw if len(b) == 1) == [bytes([i]) for i in range(256)]
    assert tb[: VOCAB - 9].tolist() == [len(b) for b in raw]


# ---- streaming ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [EMOJI_CJK, "🎉🎉🎉 漢字 " * 5, SAMPLES["multiscript"]])
def test_stream_decoder_never_breaks_a_character(tok, text):
    ids = tok.encode(text)
    assert any(b"\xef\xbf\xbd" in tok.decode([i]).encode() for i in ids), "test needs tokens that end mid-character"
    stream = StreamDecoder(tok)
    pieces = [stream.feed(i) for i in ids]
    pieces.append(stream.flush())
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text


def test_stream_decoder_flush_replaces_an_unfinished_character(tok):
    stream = StreamDecoder(tok)
    partial = [i for i in range(VOCAB - 9) if tok.token_to_bytes(i) == "🙂".encode()[:1]]
    assert stream.feed(partial[0]) == ""
    assert stream.flush() == "\ufffd"
    assert stream.feed(tok.encode("ok")[0]) == "o"  # flushed state starts clean


# ---- chat rendering ----------------------------------------------------------------------------

def spans(tok, ids, mask):
    """Collapse (ids, mask) into [(decoded text, mask value)] runs for readable assertions."""
    out, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or mask[k] != mask[start]:
            out.append((tok.decode(ids[start:k]), mask[start]))
            start = k
    return out


def test_plain_conversation_masks(tok):
    conv = {"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "See you"},
    ]}
    ids, mask = tok.render_conversation(conv)
    assert len(ids) == len(mask)
    assert spans(tok, ids, mask) == [
        ("<|bos|><|user_start|>Hi<|user_end|><|assistant_start|>", 0),
        ("Hello!<|assistant_end|>", 1),
        ("<|user_start|>Bye<|user_end|><|assistant_start|>", 0),
        ("See you<|assistant_end|>", 1),
    ]
    assert ids[0] == tok.bos_id


def test_python_call_and_output_masks(tok):
    conv = {"messages": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute. "},
            {"type": "python", "text": "2+2"},
            {"type": "python_output", "text": "4"},
            {"type": "text", "text": " It is 4."},
        ]},
    ]}
    ids, mask = tok.render_conversation(conv)
    assert spans(tok, ids, mask) == [
        ("<|bos|><|user_start|>2+2?<|user_end|><|assistant_start|>", 0),
        ("Let me compute. <|python_start|>2+2<|python_end|>", 1),
        ("<|output_start|>4<|output_end|>", 0),
        (" It is 4.<|assistant_end|>", 1),
    ]


def test_system_message_is_merged_into_first_user_turn(tok):
    with_system = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey"},
    ]}
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Hey"}]}
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)
    assert with_system["messages"][0]["role"] == "system", "rendering must not mutate the input"


def test_empty_content_renders_as_the_reference_renders_it(tok):
    """nanochat's render_conversation encodes "" to no tokens and emits the turn's markers (§5.2); it never refuses."""
    sid = tok.special_id
    conv = {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": ""},
                         {"role": "assistant", "content": ""}, {"role": "user", "content": "Q"},
                         {"role": "assistant", "content": []}]}
    ids, mask = tok.render_conversation(conv)
    assert ids == [tok.bos_id, sid("<|user_start|>"), *tok.encode("\n\n"), sid("<|user_end|>"),
                   sid("<|assistant_start|>"), sid("<|assistant_end|>"),
                   sid("<|user_start|>"), *tok.encode("Q"), sid("<|user_end|>"),
                   sid("<|assistant_start|>"), sid("<|assistant_end|>")]
    assert spans(tok, ids, mask) == [
        ("<|bos|><|user_start|>\n\n<|user_end|><|assistant_start|>", 0),
        ("<|assistant_end|>", 1),
        ("<|user_start|>Q<|user_end|><|assistant_start|>", 0),
        ("<|assistant_end|>", 1),
    ]
    assert tok.render_for_completion({"messages": conv["messages"][1:2]}) == [
        tok.bos_id, sid("<|user_start|>"), sid("<|user_end|>"), sid("<|assistant_start|>")]


def test_truncation_to_max_tokens(tok):
    conv = {"messages": [{"role": "user", "content": "word " * 50}, {"role": "assistant", "content": "answer " * 50}]}
    full_ids, full_mask = tok.render_conversation(conv)
    ids, mask = tok.render_conversation(conv, max_tokens=20)
    assert len(full_ids) > 20
    assert (ids, mask) == (full_ids[:20], full_mask[:20])


def test_render_for_completion_drops_the_answer_and_primes_the_assistant(tok):
    conv = {"messages": [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]}
    ids = tok.render_for_completion(conv)
    assert tok.decode(ids) == "<|bos|><|user_start|>S\n\nQ<|user_end|><|assistant_start|>"
    assert len(conv["messages"]) == 3, "the input conversation is left intact"
    assert tok.render_for_completion({"messages": conv["messages"][:2]}) == ids


@pytest.mark.parametrize("conv, message", [
    ({"messages": []}, "no messages"),
    ({}, "a conversation is a dict"),
    ({"messages": [{"role": "assistant", "content": "A"}]}, "expected 'user'"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q"}]}, "roles must alternate"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "system", "content": "S"}]}, "system message may only come first"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Q"}]}]}, "user content must be a string"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]}, "part 0"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": 3}]}, "a string or a list of parts"),
    ({"messages": [{"role": "user"}]}, 'must be a dict with "role" and "content"'),
    ({"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]}, "followed by a user message"),
])
def test_malformed_conversations_raise(tok, conv, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        tok.render_conversation(conv)


# ---- agreement with the reference trainer -------------------------------------------------------

def test_same_encoding_lengths_as_rustbpe_with_tiktoken(tok):
    """nanochat trains with rustbpe and encodes with tiktoken; we should compress the same text as well.

    Merge ties may be broken differently, so compare total tokens, not ids, within 1%.
    """
    rustbpe = pytest.importorskip("rustbpe")
    tiktoken = pytest.importorskip("tiktoken")
    ref = rustbpe.Tokenizer()
    ref.train_from_iterator(iter(make_corpus()), VOCAB - 9, pattern=SPLIT_PATTERN)
    enc = tiktoken.Encoding("ref", pat_str=SPLIT_PATTERN, mergeable_ranks=dict(ref.get_mergeable_ranks()), special_tokens={})
    held_out = make_corpus(n_docs=100, seed=1)
    ours = sum(len(ids) for ids in tok.encode_batch(held_out))
    theirs = sum(len(ids) for ids in enc.encode_ordinary_batch(held_out))
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)


# ---- tok_eval -----------------------------------------------------------------------------------

def test_compression_table_rows_and_relative_diff(tok):
    from jaxchat.tok_eval import SAMPLES as EVAL_SAMPLES, compression_table, format_table

    per_byte = {"gpt2": lambda text: len(text.encode("utf-8"))}  # a byte-level "reference": ratio exactly 1
    rows = compression_table(tok, {"val": "hello world " * 20}, references=per_byte)
    assert [r["text"] for r in rows] == [*EVAL_SAMPLES, "val"]
    for row in rows:
        ours = len(tok.encode({**EVAL_SAMPLES, "val": "hello world " * 20}[row["text"]]))
        assert row["ours_tokens"] == ours and row["ours_ratio"] == pytest.approx(row["bytes"] / ours)
        assert row["gpt2_ratio"] == 1.0
        assert row["vs_gpt2"] == pytest.approx((row["bytes"] - ours) / row["bytes"])
        assert "gpt4_tokens" not in row
    table = format_table(rows, ["gpt4 column skipped"])
    assert "| korean |" in table and "gpt2 tok (ratio)" in table and "gpt4 tok" not in table
    assert table.endswith("note: gpt4 column skipped")


def test_reference_encodings_are_skipped_with_a_note_when_unavailable(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    from jaxchat.tok_eval import load_reference_encoders

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    encoders, notes = load_reference_encoders()
    assert encoders == {} and len(notes) == 2 and "cl100k_base" in notes[1]
