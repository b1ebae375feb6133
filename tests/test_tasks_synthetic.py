"""Synthetic tasks (nanochat-reference.md §6.4): SpellingBee, SimpleSpelling, the word list, Identity, CustomJSON."""
import collections
import itertools
import json
import random
import re

import pytest
from http_server import FileServer

from jaxchat.sandbox import use_calculator
from jaxchat.tasks import identity, words
from jaxchat.tasks.base import extract_answer, last_text
from jaxchat.tasks.identity import FOREIGN, OPENER_TOPICS, CustomJSON, Identity, write_jsonl
from jaxchat.tasks.spelling import TEST_SEED_OFFSET, USER_TEMPLATES, SimpleSpelling, SpellingBee, calculator_can_count
from jaxchat.tokenizer import Tokenizer

WORDS = ["strawberry", "banana", "mississippi", "cat", "a", "queue", "bookkeeper", "rhythm", "zz",
         "pneumonoultramicroscopicsilicovolcanoconiosis", "dichlorodiphenyltrichloroethane"]
REFUSED = ["medieval", "directory", "profile", "open", "executive", "input"]  # hold words the calculator forbids
CALL = re.compile(r"'([a-z]+)'\.count\('([a-z])'\)")
FAST = dict(retries=3, backoff=0.0, timeout=5)


def parts(example):
    return example["messages"][1]["content"]


def word_and_letter(example):
    return CALL.fullmatch(parts(example)[2]["text"]).groups()


# ---- SpellingBee: determinism and seeds ------------------------------------------------------------

def test_same_index_gives_the_same_example_across_instances():
    a, b = SpellingBee(50, words=WORDS), SpellingBee(50, words=WORDS)
    assert [a[i] for i in range(50)] == [b[i] for i in range(50)]


def test_train_and_test_splits_differ():
    train, test = SpellingBee(50, "train", words=WORDS), SpellingBee(50, "test", words=WORDS)
    assert sum(train[i] != test[i] for i in range(50)) > 40


def test_test_example_i_is_seeded_with_ten_million_plus_i():
    # Reference: train seed = index, test seed = 10_000_000 + index (-(i+1) was dropped: random.seed(-x) == seed(x)).
    big_train = SpellingBee(TEST_SEED_OFFSET + 10, "train", words=WORDS)
    test = SpellingBee(10, "test", words=WORDS)
    assert all(test[i] == big_train.example(TEST_SEED_OFFSET + i) for i in range(10))


def test_len_and_slicing_follow_size():
    assert len(SpellingBee(300, words=WORDS)) == 300
    sliced = SpellingBee(10, words=WORDS, start=2, stop=8, step=2)
    assert len(sliced) == 3 and sliced[1] == SpellingBee(10, words=WORDS).example(4)
    with pytest.raises(IndexError):
        SpellingBee(10, words=WORDS).example(10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(size=0), "size must be a positive int"),
    (dict(size=5, split="val"), "split must be one of"),
    (dict(size=5, words=[]), "words is empty"),
    (dict(size=5, words=["ok", "Bad"]), r"words\[1\] is 'Bad'"),
    (dict(size=5, words=["it's"]), "lowercase a-z"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpellingBee(**kwargs)


# ---- SpellingBee: content ----------------------------------------------------------------------------

def test_assistant_parts_are_manual_count_then_python_check_then_answer():
    ex = SpellingBee(400, words=["strawberry"])[0]
    word, letter = word_and_letter(ex)
    n = word.count(letter)
    kinds = [p["type"] for p in parts(ex)]
    assert kinds == ["text", "text", "python", "python_output", "text"]
    manual = parts(ex)[0]["text"]
    assert manual.startswith(f"We are asked to find the number '{letter}' in the word '{word}'. "
                             "Let me try a manual approach first.")
    assert f"{word}:{','.join(word)}" in manual
    log = [line for line in manual.splitlines() if re.fullmatch(r"\d+:[a-z].*", line)]
    assert len(log) == len(word) and sum("hit!" in line for line in log) == n
    assert manual.endswith(f"This gives us {n}.")
    assert "Let me double check this using Python:" in parts(ex)[1]["text"]
    assert parts(ex)[3]["text"] == str(n)
    assert parts(ex)[4]["text"].endswith(f"Python gives us {n}.\n\nMy final answer is:\n\n#### {n}")


def test_calculator_call_returns_the_answer_in_the_text():
    bee = SpellingBee(1500, words=WORDS + REFUSED + list(words.fallback_words()))
    for i in range(len(bee)):
        ex = bee[i]
        word, letter = word_and_letter(ex)
        assert word not in REFUSED
        value = use_calculator(parts(ex)[2]["text"])
        assert value == word.count(letter) == int(parts(ex)[3]["text"]) == int(extract_answer(last_text(ex))), i


def test_words_the_calculator_refuses_are_left_out_of_spelling_bee():
    assert all(use_calculator(f"'{w}'.count('e')") is None for w in REFUSED)  # why they must go
    assert SpellingBee(5, words=WORDS + REFUSED).words == WORDS
    assert SimpleSpelling(5, words=REFUSED).words  # spelling needs no tool: it keeps them
    with pytest.raises(ValueError, match="every word contains something the calculator refuses"):
        SpellingBee(5, words=REFUSED)


def test_letter_comes_from_the_word_about_90_percent_of_the_time():
    bee = SpellingBee(2000, words=WORDS)
    in_word = sum(letter in word for word, letter in map(word_and_letter, bee))
    assert 0.88 <= in_word / len(bee) < 0.97  # 90% from the word, plus random letters that happen to be in it


def _template_patterns():
    patterns = []
    for t in USER_TEMPLATES:
        body = (re.escape(t).replace(r"\{letter\}", r"(?P<lq>['\"]?)(?P<letter>[a-z])(?P=lq)")
                .replace(r"\{word\}", r"(?P<wq>['\"]?)(?P<word>[a-z]+)(?P=wq)"))
        patterns.append(re.compile(body + r"\??", re.IGNORECASE))
    return patterns


def test_templates_are_distinct_and_hold_each_placeholder_once():
    assert len(USER_TEMPLATES) >= 50
    assert len({t.lower() for t in USER_TEMPLATES}) == len(USER_TEMPLATES)
    for t in USER_TEMPLATES:
        assert t.count("{letter}") == 1 and t.count("{word}") == 1 and t.count("{") == 2, t
        assert not t.endswith("?"), t


def test_every_template_is_reachable_with_every_variation():
    """Each template occurs; lower-casing, both quote styles and the optional '?' all occur at their rates."""
    bee, patterns = SpellingBee(3000, words=WORDS), _template_patterns()
    hits, quotes = collections.Counter(), collections.Counter()
    cased = lowered = question = 0
    for ex in bee:
        user = ex["messages"][0]["content"]
        word, letter = word_and_letter(ex)
        matches = [k for k, p in enumerate(patterns)
                   if (m := p.fullmatch(user)) and m["word"] == word and m["letter"] == letter]
        assert len(matches) == 1, user
        hits[matches[0]] += 1
        if USER_TEMPLATES[matches[0]] != USER_TEMPLATES[matches[0]].lower():
            cased += 1
            lowered += re.fullmatch(patterns[matches[0]].pattern, user) is None  # matches only ignoring case
        question += user.endswith("?")
        quotes.update(q for q in "'\"" if f"{q}{word}{q}" in user or f"{q}{letter}{q}" in user)
    assert set(hits) == set(range(len(USER_TEMPLATES)))
    assert 0.25 < lowered / cased < 0.35 and quotes["'"] > 0 and quotes['"'] > 0
    assert 0.45 < question / len(bee) < 0.55


def test_languages_beyond_english_are_present():
    users = " ".join(t for t in USER_TEMPLATES)
    for sample in ("Cuántas", "Combien", "Wie viele", "几个", "몇 개", "いくつ"):
        assert sample in users


# ---- SpellingBee: rendering and grading ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    bee = SpellingBee(200, words=WORDS)
    texts = [ex["messages"][0]["content"] + " ".join(p["text"] for p in parts(ex)) for ex in bee]
    return Tokenizer.train(texts, 320)


def test_rendered_mask_trains_assistant_text_and_tool_call_but_not_user_or_tool_output(tokenizer):
    ex = SpellingBee(20, words=WORDS)[7]
    ids, mask = tokenizer.render_conversation(ex)
    p = parts(ex)
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    untrained = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert trained == (p[0]["text"] + p[1]["text"] + "<|python_start|>" + p[2]["text"] + "<|python_end|>"
                       + p[4]["text"] + "<|assistant_end|>")
    assert untrained == ("<|bos|><|user_start|>" + ex["messages"][0]["content"] + "<|user_end|><|assistant_start|>"
                         + "<|output_start|>" + p[3]["text"] + "<|output_end|>")


def test_evaluate_compares_the_hash_answer():
    bee = SpellingBee(5, words=["strawberry"])
    ex = bee[0]
    n = int(extract_answer(last_text(ex)))
    assert bee.evaluate(ex, f"Counting... so the answer is\n\n#### {n}")
    assert not bee.evaluate(ex, f"#### {n + 1}")
    assert not bee.evaluate(ex, f"the answer is {n}")  # no #### marker, no credit
    assert bee.reward(ex, f"#### {n}") == 1.0 and bee.reward(ex, "#### -1") == 0.0


def test_evaluate_refuses_a_reference_without_an_answer():
    bee = SpellingBee(5, words=WORDS)
    broken = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "no answer"}]}
    with pytest.raises(ValueError, match="no '#### N' answer"):
        bee.evaluate(broken, "#### 1")


# ---- SimpleSpelling ------------------------------------------------------------------------------------

def test_simple_spelling_spells_a_word_from_the_seed_42_shuffle():
    task = SimpleSpelling(100, words=WORDS)
    shuffled = list(WORDS)
    random.Random(42).shuffle(shuffled)
    for i in range(100):
        word = random.Random(i).choice(shuffled)
        assert task[i]["messages"] == [{"role": "user", "content": f"Spell the word: {word}"},
                                       {"role": "assistant", "content": f"{word}:{','.join(word)}"}]
    assert task[0] == SimpleSpelling(100, words=WORDS)[0]
    assert [task[i] for i in range(20)] != [SimpleSpelling(20, "test", words=WORDS)[i] for i in range(20)]


def test_simple_spelling_does_not_shuffle_the_callers_list():
    given = list(WORDS)
    SimpleSpelling(5, words=given)
    assert given == WORDS


def test_simple_spelling_evaluate_is_exact_match():
    task = SimpleSpelling(3, words=["cat"])
    ex = task[0]
    assert task.evaluate(ex, " cat:c,a,t\n") and not task.evaluate(ex, "cat:c,a,t,t")


# ---- the word list -------------------------------------------------------------------------------------

# 17,576 three-letter words with the real file's CRLF line endings: above the download's minimum size.
SERVED = ["".join(t) for t in itertools.product("abcdefghijklmnopqrstuvwxyz", repeat=3)]
SERVED_BYTES = "\r\n".join(SERVED).encode() + b"\r\n"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_HOME", str(tmp_path))
    monkeypatch.delenv("JAXCHAT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("JAXCHAT_WORDS_URL", raising=False)
    return tmp_path


def test_download_retries_a_server_error_then_stores_the_list(home):
    with FileServer({"words_alpha.txt": SERVED_BYTES}) as srv:
        srv.fail("words_alpha.txt", times=1, status=500)
        got = words.load_words(srv.url("words_alpha.txt"), **FAST)
        assert [r.status for r in srv.requests("words_alpha.txt")] == [500, 200]
    assert got == SERVED
    assert (home / "words_alpha.txt").read_bytes() == SERVED_BYTES


def test_download_url_comes_from_the_environment(home, monkeypatch):
    with FileServer({"mirror/words.txt": SERVED_BYTES}) as srv:
        monkeypatch.setenv("JAXCHAT_WORDS_URL", srv.url("mirror/words.txt"))
        assert words.load_words(**FAST) == SERVED
        assert len(srv.requests()) == 1


def test_a_present_file_is_used_without_network(home):
    (home / "words_alpha.txt").write_text("apple\r\nbanana\r\n\r\n")
    with FileServer({}) as srv:
        assert words.load_words(srv.url("words_alpha.txt"), **FAST) == ["apple", "banana"]
        assert srv.requests() == []


def test_a_present_file_that_is_not_a_word_list_is_an_error(home):
    (home / "words_alpha.txt").write_text("apple\n\nBanana\n")
    with pytest.raises(words.WordListError, match="line 3 is 'Banana'"):
        words.load_words()


def _check_unavailable(e, home):
    msg = str(e.value)
    assert str(home / "words_alpha.txt") in msg and "`python -m jaxchat.tasks.words`" in msg


def test_offline_without_the_list_is_an_error_naming_the_command(home, monkeypatch):
    monkeypatch.setenv("JAXCHAT_OFFLINE", "1")
    with FileServer({"words_alpha.txt": SERVED_BYTES}) as srv:
        with pytest.raises(words.WordListUnavailable, match="offline") as e:
            words.load_words(srv.url("words_alpha.txt"), **FAST)
        assert srv.requests() == []
    _check_unavailable(e, home)


def test_a_failed_download_is_an_error_not_a_fallback(home):
    with FileServer({}) as srv:  # 404: a wrong URL is not retried
        with pytest.raises(words.WordListUnavailable, match="HTTP 404") as e:
            words.load_words(srv.url("words_alpha.txt"), **FAST)
    _check_unavailable(e, home)
    assert not (home / "words_alpha.txt").exists()


def test_a_download_that_is_not_a_word_list_is_rejected(home):
    page = b"<html><body>rate limited</body></html>\n" * 20_000
    with FileServer({"words_alpha.txt": page}) as srv:
        with pytest.raises(words.WordListUnavailable, match="failed verification"):
            words.load_words(srv.url("words_alpha.txt"), retries=1, backoff=0.0, timeout=5)
    assert not (home / "words_alpha.txt").exists()


def test_fetch_command_downloads_the_list_and_replaces_a_truncated_copy(home, monkeypatch):
    with FileServer({"words_alpha.txt": SERVED_BYTES}) as srv:
        monkeypatch.setenv("JAXCHAT_WORDS_URL", srv.url("words_alpha.txt"))
        assert words.main([]) == 0
        (home / "words_alpha.txt").write_bytes(SERVED_BYTES[:1000])  # damaged: far too few words
        assert words.main([]) == 0
        assert len(srv.requests("words_alpha.txt")) == 2
    assert (home / "words_alpha.txt").read_bytes() == SERVED_BYTES


def test_a_truncated_word_list_is_rejected():
    with pytest.raises(words.WordListError, match="only 3 words"):
        words.parse_words("a\nb\nc\n", "x", min_words=words.MIN_DOWNLOADED_WORDS)


def test_tasks_refuse_to_build_without_the_real_list_unless_given_words(home, monkeypatch):
    monkeypatch.setenv("JAXCHAT_OFFLINE", "1")
    for task in (SpellingBee, SimpleSpelling):  # the reference mixtures' and the SpellingBee eval's path
        with pytest.raises(words.WordListUnavailable, match="python -m jaxchat.tasks.words"):
            task(10)
    # the tiny recipe names its words (mixture "tiny", TinySpellingBee), so it builds offline
    bee = SpellingBee(10, words=words.fallback_words())
    assert bee.words == [w for w in words.fallback_words() if calculator_can_count(w)]
    (home / "words_alpha.txt").write_text("\n".join(SERVED))
    assert sorted(SimpleSpelling(10).words) == SERVED


def test_the_tiny_config_builds_its_spelling_tasks_offline(home, monkeypatch):
    from jaxchat.config import load_config_file
    from jaxchat.tasks import eval_task
    from jaxchat.tasks.mixtures import mixture

    monkeypatch.setenv("JAXCHAT_OFFLINE", "1")
    c = load_config_file("configs/tiny.py")
    for stage in ("mid", "sft"):
        assert len(mixture(stage, c[stage].mixture, "train")) > 0
    assert all(len(eval_task(t)) > 0 for t in c.eval.chat_tasks.split(","))
    assert not (home / "words_alpha.txt").exists()


# ---- Identity -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ident():
    return Identity()


def test_identity_has_1000_distinct_conversations_by_default(ident):
    convs = [json.dumps(c["messages"], ensure_ascii=False) for c in ident]
    assert len(ident) == 1000 and len(set(convs)) == 1000


def test_identity_conversations_alternate_and_render(ident):
    tok = __import__("fixtures_tok").ByteTokenizer()
    for conv in ident:
        msgs = conv["messages"]
        assert 2 <= len(msgs) <= 6 and len(msgs) % 2 == 0
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        assert all(isinstance(m["content"], str) and m["content"] for m in msgs)
        ids, mask = tok.render_conversation(conv)
        assert sum(mask) > 0


def test_identity_conversations_mention_jaxchat_and_cover_every_opener(ident):
    assert all(any("jaxchat" in m["content"] for m in c["messages"] if m["role"] == "assistant") for c in ident)
    openers = {c["messages"][0]["content"] for c in ident}
    assert len(openers) >= 150
    for topic in OPENER_TOPICS:  # every English opener topic starts some conversation
        assert any(c["messages"][0]["content"].lower().rstrip("?!.") in
                   {q.lower().rstrip("?!.") for q in identity.TOPICS[topic].questions} for c in ident), topic
    for lang, kinds in FOREIGN.items():
        questions = {q for qs, _ in kinds.values() for q in qs}
        assert any(c["messages"][0]["content"] in questions for c in ident), lang
    assert {len(c["messages"]) // 2 for c in ident} == {1, 2, 3}


def test_identity_is_deterministic_and_size_is_a_prefix(ident):
    assert Identity(1000)[123] == ident[123]
    small = Identity(size=10)
    assert len(small) == 10 and [small[i] for i in range(10)] == [ident[i] for i in range(10)]


def test_identity_examples_are_copies(ident):
    ident[0]["messages"][0]["content"] = "edited"
    assert ident[0]["messages"][0]["content"] != "edited"


def test_identity_refuses_a_size_the_templates_cannot_reach(monkeypatch):
    monkeypatch.setattr(identity, "conversation", lambda seed: [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "jaxchat"}])
    with pytest.raises(ValueError, match="more than the templates can produce"):
        Identity(size=2)
    with pytest.raises(ValueError, match="positive int"):
        Identity(size=0)


# ---- CustomJSON ---------------------------------------------------------------------------------------

def test_custom_json_round_trips_the_identity_conversations(tmp_path, ident):
    path = write_jsonl(Identity(25), tmp_path / "identity.jsonl")
    task = CustomJSON(path)
    assert len(task) == 25 and [task[i] for i in range(25)] == [ident[i] for i in range(25)]


def test_custom_json_main_writes_the_file(tmp_path):
    identity.main(["--out", str(tmp_path / "out.jsonl"), "--size", "7"])
    assert len(CustomJSON(tmp_path / "out.jsonl")) == 7


def test_custom_json_skips_blank_lines_and_accepts_messages_objects(tmp_path):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(conv) + "\n\n" + json.dumps({"messages": conv}) + "\n")
    task = CustomJSON(path)
    assert len(task) == 2 and task[0]["messages"] == task[1]["messages"] == conv


GOOD = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])


@pytest.mark.parametrize("bad, match", [
    ("{not json", "not valid JSON"),
    ('"a string"', "expected a JSON list of messages"),
    (json.dumps([{"role": "user", "content": "hi"}]), "at least one user and one assistant"),
    (json.dumps([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]),
     "message 0 has role 'assistant', expected 'user'"),
    (json.dumps([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
     "message 1 has role 'user', expected 'assistant'"),
    (json.dumps([{"role": "user"}, {"role": "assistant", "content": "b"}]), 'message 0 must be an object with "role"'),
    (json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]), "non-empty string"),
    (json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": [1]}]), "non-empty string"),
])
def test_custom_json_errors_name_the_line(tmp_path, bad, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{GOOD}\n\n{bad}\n{GOOD}\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: ") + ".*" + match):
        CustomJSON(path)


def test_custom_json_missing_or_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at .*nope.jsonl"):
        CustomJSON(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no conversations"):
        CustomJSON(tmp_path / "empty.jsonl")
