"""The inference engine: the cached forward equals model.forward, greedy decoding with the cache equals greedy decoding
by full forward passes (MHA/GQA/MQA, mixed prompt lengths, across buckets), sampling semantics, the calculator tool
state machine on a scripted model, per-row stopping, and no recompilation across varied requests."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fixtures_model
from fixtures_tok import ByteTokenizer
from jaxchat import engine, model
from jaxchat.config import model_config

TOK = ByteTokenizer()
V = TOK.vocab_size  # 265: bytes + the 9 specials as the last ids, as in the real tokenizer


def tiny(n_kv_head=4, **kw):
    base = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64, sequence_len=256,
                compute_dtype="float32")
    return model.GPTConfig(**{**base, **kw})


def random_params(cfg, seed=1, scale=0.3):
    """Every weight random (zero-init projections and head would make all logits equal), special-token columns of the
    head zeroed so greedy decoding never stops or calls the tool: those paths have their own tests."""
    graphdef, params = fixtures_model.random_params(cfg, seed, scale)
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, 256:].set(0.0)
    return graphdef, params


def prompt(text: str) -> list[int]:
    return TOK.encode(text, prepend="<|bos|>")


def greedy_by_full_forward(graphdef, params, prompts, max_tokens):
    """The obvious algorithm: run model.forward on the whole growing sequence and take the argmax at its end.
    Sequences are right-padded to one width so a single compiled forward serves every step; causality keeps the padding
    invisible to the positions read."""
    width = max(len(p) + m for p, m in zip(prompts, max_tokens))
    forward = jax.jit(lambda ids: model.forward(graphdef, params, ids))
    seqs = [list(p) for p in prompts]
    for _ in range(max(max_tokens)):
        ids = np.zeros((len(seqs), width), np.int32)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
        logits = np.asarray(forward(ids))
        for i, s in enumerate(seqs):
            if len(s) < len(prompts[i]) + max_tokens[i]:
                s.append(int(np.argmax(logits[i, len(s) - 1])))
    return seqs


KV_HEADS = pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])


@KV_HEADS
def test_cached_forward_equals_model_forward(n_kv_head):
    cfg = tiny(n_kv_head)
    graphdef, params = random_params(cfg)
    lengths = np.array([5, 19, 32], np.int32)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (3, 40)).astype(np.int32)
    full = np.asarray(model.forward(graphdef, params, jnp.asarray(tokens)))

    # prefill: every valid position, and the last-token-only path the engine's prefill uses
    forward_cached = jax.jit(model.forward_cached, static_argnums=0)
    cache = model.KVCache.zeros(cfg, 3, 64)
    logits_all, _ = forward_cached(graphdef, params, tokens[:, :32], cache)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(logits_all)[b, :n], full[b, :n], atol=2e-5, rtol=1e-5)
    logits_last, cache = forward_cached(graphdef, params, tokens[:, :32], cache, last_B=jnp.asarray(lengths - 1))
    np.testing.assert_allclose(np.asarray(logits_last), full[np.arange(3), lengths - 1], atol=2e-5, rtol=1e-5)
    assert cache.k[0].shape == (3, n_kv_head, 64, cfg.head_dim)  # (B, H_kv, S, D): only the kv heads are cached
    np.testing.assert_array_equal(np.asarray(cache.lengths_B), [32, 32, 32])

    # decode: each row continues from its own length with the true next tokens (per-row positions); the padding
    # written past a row's length is overwritten as it goes and never attended before that
    cache = model.KVCache(cache.k, cache.v, jnp.asarray(lengths), cache.last_tokens_B)
    for step in range(6):
        pos = lengths + step
        logits, cache = forward_cached(graphdef, params, jnp.asarray(tokens[np.arange(3), pos])[:, None], cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[np.arange(3), pos], atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths_B), lengths + 6)


@KV_HEADS
def test_greedy_with_cache_equals_greedy_by_full_forward(n_kv_head):
    cfg = tiny(n_kv_head)
    graphdef, params = random_params(cfg, seed=n_kv_head)
    # prompt lengths on both sides of the 16/32 prompt buckets; lengths + max_tokens cross the 64-token cache bucket
    prompts = [prompt("hi"), prompt("fifteen chars.."), prompt("y" * 31), prompt("z" * 40)]  # 3, 16, 32, 41 tokens
    max_tokens = [30, 49, 20, 30]
    eng = engine.Engine(cfg, params, TOK)
    got, masks = eng.generate_batch(prompts, max_tokens=max_tokens, temperature=0.0)
    want = greedy_by_full_forward(graphdef, params, prompts, max_tokens)
    assert got == want
    assert [len(g) - len(p) for g, p in zip(got, prompts)] == max_tokens
    for p, m in zip(prompts, masks):
        assert m == [0] * len(p) + [1] * (len(m) - len(p))


def test_samples_share_the_prefill_but_sample_independently():
    cfg = tiny()
    _, params = random_params(cfg, scale=0.1)
    eng = engine.Engine(cfg, params, TOK)
    rows, _ = eng.generate_batch(prompt("abc"), num_samples=8, max_tokens=6, temperature=1.0, seed=3)
    first_tokens = {r[4] for r in rows}
    assert len(first_tokens) > 1, "every sample drew the same first token: the first sample was broadcast"
    greedy, _ = eng.generate_batch(prompt("abc"), num_samples=8, max_tokens=6, temperature=0.0)
    assert all(g == greedy[0] for g in greedy)


def test_same_seed_same_output_and_different_seeds_differ():
    cfg = tiny()
    _, params = random_params(cfg, scale=0.1)
    eng = engine.Engine(cfg, params, TOK)
    run = lambda seed: eng.generate_batch(prompt("hello"), num_samples=8, max_tokens=12, temperature=1.0, seed=seed)[0]
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_temperature_zero_ignores_the_seed():
    cfg = tiny()
    _, params = random_params(cfg, scale=0.1)
    eng = engine.Engine(cfg, params, TOK)
    run = lambda seed, top_k: eng.generate_batch(prompt("hello"), max_tokens=10, temperature=0.0, top_k=top_k,
                                                 seed=seed)[0]
    assert run(1, None) == run(2, None) == run(3, 5)


def test_top_k_never_samples_outside_the_top_k():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(32, V)) * 3, jnp.float32)
    top_k = jnp.asarray(rng.integers(1, 12, 32), jnp.int32)  # a different k on every row, in one program
    temperature = jnp.full((32,), 2.0)
    order = np.argsort(-np.asarray(logits), axis=-1)
    allowed = [set(order[b, :int(top_k[b])]) for b in range(32)]
    seen = [set() for _ in range(32)]
    sample = jax.jit(engine.sample_tokens, static_argnums=3)
    rows = lambda seed, k: engine.Sampling.rows(np.full(32, seed), np.arange(32), temperature, k, np.ones(32))  # noqa: E731
    steps = np.zeros(32, np.int32)
    for i in range(200):
        out = np.asarray(sample(logits, steps, rows(i, top_k), engine.DEFAULT_MAX_TOP_K))
        for b in range(32):
            assert out[b] in allowed[b], f"row {b} sampled {out[b]} outside its top {int(top_k[b])}"
            seen[b].add(int(out[b]))
    assert sum(len(s) for s in seen) > 32 * 2  # it samples, not argmax: several of the top k come up
    top1 = sample(logits, steps, rows(0, np.ones(32)), engine.DEFAULT_MAX_TOP_K)
    np.testing.assert_array_equal(np.asarray(top1), order[:, 0])


def test_top_p_keeps_the_nucleus_and_greedy_rows_take_the_argmax():
    # row 0: one token holds 90% of the mass, so top_p = 0.5 always draws it; row 1 samples freely; row 2 is greedy
    logits = np.full((3, V), -10.0, np.float32)
    logits[0, 7], logits[0, 8:12] = 5.0, 2.6
    logits[1, :20] = 0.0
    logits[2, :20], logits[2, 13] = 0.0, 0.1
    s = engine.Sampling.rows([0, 0, 0], [0, 1, 2], [1.0, 1.0, 0.0], [0, 0, 0], [0.5, 1.0, 1.0])
    sample = jax.jit(engine.sample_tokens, static_argnums=3)
    draws = np.array([np.asarray(sample(jnp.asarray(logits), np.full(3, step, np.int32), s, 50)) for step in range(64)])
    assert set(draws[:, 0]) == {7}
    assert len(set(draws[:, 1])) > 5
    assert set(draws[:, 2]) == {13}


# ---- scripted model: a bigram machine built from real weights ---------------------------------------------------------


def scripted_params(cfg, transitions: dict[int, int], seed=0):
    """Weights whose greedy next token depends only on the current token: `transitions[a] = b`.

    model.init zero-initialises every residual projection, so each block is the identity and the logits are
    rms_norm(e_a) @ W_head. Column b of the head is the sum of the (normalised) embeddings of the tokens that lead to b:
    the match scores D·scale while unrelated embeddings score ~sqrt(D)·scale.
    """
    _, params = model.init(cfg, seed)
    e = np.asarray(model.rms_norm(params["wte"]))
    head = np.zeros((cfg.n_embd, cfg.vocab_size), np.float32)
    for a, b in transitions.items():
        head[:, b] += e[a] * (20.0 / cfg.n_embd)
    params["lm_head"]["kernel"] = jnp.asarray(head)
    return params


def chain(*tokens) -> dict[int, int]:
    ids = [TOK.special_id(t) if isinstance(t, str) and t.startswith("<|") else (t if isinstance(t, int) else ord(t))
           for t in tokens]
    return dict(zip(ids[:-1], ids[1:]))


def sp(name):
    return TOK.special_id(name)


def test_calculator_result_is_forced_in_with_mask_zero():
    cfg = tiny()
    script = chain("?", "<|python_start|>", "1", "5", "*", "2", "3", "<|python_end|>")
    script.update(chain("<|output_end|>", "!", "<|assistant_end|>"))
    eng = engine.Engine(cfg, scripted_params(cfg, script), TOK)
    p = prompt("what is 15*23?")
    rows, masks = eng.generate_batch(p, max_tokens=30, temperature=0.0)
    call = [sp("<|python_start|>"), *b"15*23", sp("<|python_end|>")]
    output = [sp("<|output_start|>"), *b"345", sp("<|output_end|>")]
    assert rows[0] == p + call + output + [ord("!")]  # the terminal <|assistant_end|> is not part of the row
    assert masks[0] == [0] * len(p) + [1] * len(call) + [0] * len(output) + [1]


def test_refused_tool_call_forces_nothing_and_rows_stop_independently():
    cfg = tiny()
    script = chain("?", "<|python_start|>", "a", "b", "c", "<|python_end|>", "<|assistant_end|>")  # "abc": refused
    script.update(chain(".", "Q", "<|bos|>"))  # a row may also end on <|bos|>
    script.update(chain("#", "r", "s", "t", "u", "v", "w", "x", "y", "z", "r"))  # never stops: max_tokens ends it
    eng = engine.Engine(cfg, scripted_params(cfg, script), TOK)
    prompts = [prompt("a?"), prompt("ends."), prompt("#")]
    steps = list(eng.generate(prompts, max_tokens=[20, 20, 12], temperature=0.0))
    assert len(steps) == 12  # until the longest row is done
    rows, masks = eng.generate_batch(prompts, max_tokens=[20, 20, 12], temperature=0.0)
    assert rows[0] == prompts[0] + [sp("<|python_start|>"), *b"abc", sp("<|python_end|>")]
    assert rows[1] == prompts[1] + [ord("Q")]
    assert rows[2] == prompts[2] + list(b"rstuvwxyzrst")
    assert all(set(m[len(p):]) == {1} for m, p in zip(masks, prompts))
    # the streaming view: row 1 is active for two steps (Q, then <|bos|>), then only filler
    assert [s.active[1] for s in steps] == [True, True] + [False] * 10
    assert steps[1].tokens[1] == TOK.bos_id


def test_no_recompilation_across_100_requests_of_varied_lengths():
    cfg = tiny()
    _, params = random_params(cfg, scale=0.1)
    eng = engine.Engine(cfg, params, TOK)
    rng = np.random.default_rng(0)

    def request(length):
        ids = [TOK.bos_id] + rng.integers(0, 256, length - 1).tolist()
        return eng.generate_batch(ids, max_tokens=4, temperature=float(rng.choice([0.0, 0.7, 1.3])),
                                  top_k=int(rng.choice([0, 1, 5, 50])), seed=int(rng.integers(1 << 30)))

    for length in (10, 20, 40):  # warm-up: one request per prompt bucket (16, 32, 64); the cache bucket is 64
        request(length)
    before = dict(engine.TRACES)
    for _ in range(100):
        request(int(rng.integers(1, 61)))
    assert dict(engine.TRACES) == before


def test_prompt_batches_are_bucketed_to_powers_of_two():
    cfg = tiny()
    _, params = random_params(cfg, scale=0.1)
    eng = engine.Engine(cfg, params, TOK)
    eng.generate_batch([prompt("a")] * 3, max_tokens=2, temperature=0.0)
    before = dict(engine.TRACES)
    rows, _ = eng.generate_batch([prompt("b")] * 4, max_tokens=2, temperature=0.0)  # 3 and 4 prompts: one program
    assert dict(engine.TRACES) == before and len(rows) == 4


def test_clear_errors():
    cfg = tiny(sequence_len=32)
    _, params = random_params(cfg, scale=0.1)
    eng = engine.Engine(cfg, params, TOK, max_top_k=50)
    with pytest.raises(ValueError, match="empty"):
        eng.generate_batch([[]])
    with pytest.raises(ValueError, match="max_top_k=100"):
        eng.generate_batch(prompt("a"), max_tokens=2, top_k=100)
    with pytest.raises(ValueError, match="no room"):
        eng.generate_batch(prompt("x" * 40))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        eng.generate_batch([1, 2, 999], max_tokens=2)
    with pytest.raises(ValueError, match="one per prompt"):
        eng.generate_batch([prompt("a"), prompt("b")], max_tokens=2, temperature=[0.5])


def test_bucket():
    assert [engine.bucket(n, 16) for n in (1, 16, 17, 33, 64, 65)] == [16, 16, 32, 64, 64, 128]
    assert [engine.bucket(n, 1) for n in (1, 2, 3, 5)] == [1, 2, 4, 8]


# ---- the chat CLI -----------------------------------------------------------------------------------------------------

CLI_CONFIG = """
from jaxchat.config import default_config

def get_config():
    c = default_config()
    c.depth, c.model_dim, c.n_head, c.head_dim = 2, 64, 4, 16
    c.vocab_size, c.sequence_len, c.compute_dtype = 300, 64, "float32"
    return c
"""


@pytest.fixture
def cli_run(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_HOME", str(tmp_path / "home"))
    path = tmp_path / "chattiny.py"
    path.write_text(CLI_CONFIG)
    return str(path)


def test_chat_without_a_checkpoint_names_the_training_command(cli_run, capsys):
    from jaxchat import chat

    assert chat.main([f"--config={cli_run}", "--stage=sft", "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert "no sft checkpoint" in err and f"python train.py --config={cli_run} --stage=sft" in err  # the file given


def test_chat_answers_a_prompt_from_a_saved_checkpoint(cli_run, capsys):
    from jaxchat import chat, paths
    from jaxchat.checkpoint import Checkpointer
    from jaxchat.config import load_config_file
    from jaxchat.tokenizer import Tokenizer

    config = load_config_file(cli_run)
    text = ["the cat sat on the mat and the dog sat on the log. " * 20, "hello there, how are you today? " * 20]
    tok = Tokenizer.train(text, vocab_size=300)
    tok.save(paths.tokenizer_dir("chattiny"))
    cfg = model_config(config)
    script = {tok.special_id("<|assistant_start|>"): tok.encode("cat")[0],
              tok.encode("cat")[0]: tok.special_id("<|assistant_end|>")}
    params = scripted_params(cfg, script)
    with Checkpointer(paths.run_dir("chattiny", "base") / "checkpoints", async_save=False) as ckpt:
        ckpt.save(7, params=params, opt_state={"count": jnp.zeros((), jnp.int32)}, rng=jax.random.key(0),
                  data_state={}, config=config.to_dict())
    assert chat.main([f"--config={cli_run}", "--stage=base", "-p", "which animal?", "-t", "0"]) == 0
    out = capsys.readouterr()
    assert out.out == tok.decode(tok.encode("cat")[:1]) + "\n"
    assert "step 7" in out.err
    # the interactive loop: two turns, clear, quit
    import io
    import types

    from jaxchat.engine import Engine

    eng = Engine(cfg, params, tok)
    args = types.SimpleNamespace(prompt=None, max_tokens=8, temperature=0.0, top_k=50, seed=0)
    out = io.StringIO()
    chat.chat_loop(eng, args, stdin=io.StringIO("which animal?\nand again?\nclear\nquit\n"), out=out)
    text = out.getvalue()
    assert text.count("Assistant: cat\n") == 2 and "(new conversation)" in text
