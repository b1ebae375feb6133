"""RL: advantages, rows and the policy-gradient loss against a hand-computed example (masked tool output, a row that
stopped early), then the whole stage through the shared loop: mean reward rises on a task a tiny model can learn, and
resuming mid-RL is exact."""
import json

import jax
import numpy as np
import pytest
from fixtures_model import random_params
from fixtures_tok import ByteTokenizer

from jaxchat import config as C
from jaxchat import model, paths, rl, stages, trainer
from jaxchat.tasks.base import Task

TOK = ByteTokenizer()
PAD = TOK.special_id("<|assistant_end|>")


def test_group_advantages_subtract_each_questions_mean():
    rewards = np.array([1, 0, 0, 0, 1, 1, 1, 1], np.float32)  # 2 questions x 4 samples
    np.testing.assert_allclose(rl.group_advantages(rewards, 4), [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])


def test_rows_train_only_sampled_tokens():
    # row 0: prompt [1, 2], sampled 10, python call 11 12 (sampled), forced output 13 14 (mask 0), sampled 15
    # row 1: prompt [1, 2], sampled 20, then stopped early: padded
    rows = [[1, 2, 10, 11, 12, 13, 14, 15], [1, 2, 20]]
    masks = [[0, 0, 1, 1, 1, 0, 0, 1], [0, 0, 1]]
    inputs, targets = rl.build_rows(rows, masks, PAD, seq_len=8)
    np.testing.assert_array_equal(inputs, [[1, 2, 10, 11, 12, 13, 14, 15], [1, 2, 20, PAD, PAD, PAD, PAD, PAD]])
    np.testing.assert_array_equal(targets, [[-1, 10, 11, 12, -1, -1, 15, -1], [-1, 20, -1, -1, -1, -1, -1, -1]])
    inputs, targets = rl.build_rows(rows, masks, PAD, seq_len=4)  # too long: cut at seq_len + 1 tokens
    np.testing.assert_array_equal(targets[0], [-1, 10, 11, 12])
    with pytest.raises(ValueError, match="row 0: 3 tokens but 2 mask values"):
        rl.build_rows([[1, 2, 3]], [[0, 1]], PAD, 4)


def test_pg_loss_by_hand():
    cfg = model.GPTConfig(vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, sequence_len=16,
                          compute_dtype="float32")
    graphdef, params = random_params(cfg)
    rows = [[1, 2, 10, 11, 12, 13, 14, 15], [1, 2, 20]]
    masks = [[0, 0, 1, 1, 1, 0, 0, 1], [0, 0, 1]]
    inputs, targets = rl.build_rows(rows, masks, PAD, seq_len=8)
    advantages = np.array([0.5, -0.5], np.float32)
    logits = np.asarray(model.forward(graphdef, params, inputs), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    # sampled targets: row 0 at positions 1, 2, 3, 6; row 1 at position 1 -> 5 tokens
    picked = [(0, 1, 10), (0, 2, 11), (0, 3, 12), (0, 6, 15), (1, 1, 20)]
    expected = -sum(logp[b, t, tok] * advantages[b] for b, t, tok in picked) / 5
    got = float(rl.pg_loss(params, graphdef, inputs, targets, advantages))
    assert got == pytest.approx(expected, rel=1e-5)
    # zero advantages (every sample of a question equally good) give no gradient at all
    grads = jax.grad(rl.pg_loss)(params, graphdef, inputs, targets, np.zeros(2, np.float32))
    assert all(float(np.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


class StartsWithDigit(Task):
    """Reward 1 when the answer starts with a digit: ~4% of a uniform byte policy's samples, so a fresh tiny model gets
    a learning signal at once and can learn the task in a few dozen steps."""

    def num_examples(self):
        return 1000

    def example(self, i):
        return {"messages": [{"role": "user", "content": f"Say a number ({i})"}]}

    def evaluate(self, conversation, completion):
        return completion[:1].isdigit()


def rl_config(run, num_iterations, save_every):
    c = C.default_config()
    c.run = run
    c.depth, c.head_dim, c.vocab_size, c.sequence_len = 2, 32, TOK.vocab_size, 32
    c.compute_dtype, c.muon_ns_dtype, c.seed = "float32", "float32", 0
    c.log_every = 1
    c.rl.num_iterations, c.rl.save_every = num_iterations, save_every
    c.rl.examples_per_step, c.rl.num_samples, c.rl.max_new_tokens = 8, 8, 3
    c.rl.sequence_len, c.rl.device_batch_size = 32, 16
    c.rl.init_lr_frac, c.rl.warmdown_ratio = 1.0, 0.0  # constant LR: the horizon does not change the schedule
    c.rl.metric_every = -1
    return c


def run_rl(run, num_iterations, save_every=-1):
    config = rl_config(run, num_iterations, save_every)
    stage, sc = stages.rl_stage(config, TOK, train_task=StartsWithDigit(), test_task=None)
    stage.init_params = None  # a fresh model instead of an SFT checkpoint
    return trainer.run(sc, stage, TOK, log=lambda s: None)


def metrics(run):
    path = paths.run_dir(run, "rl") / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def straight():
    result = run_rl("rl-straight", 12)
    assert result.completed
    return metrics("rl-straight")


def test_mean_reward_rises_on_a_learnable_task(straight):
    rewards = [r["reward"] for r in straight]
    assert len(rewards) == 12 and all("samples_per_s" in r and "seq_len" in r for r in straight)
    assert rewards[0] < 0.15 and np.mean(rewards[-4:]) > 0.8, rewards  # ~4% at first (10 digits of 265 ids)


def test_resume_mid_rl_is_exact(straight):
    part = run_rl("rl-resume", 5, save_every=5)
    assert part.step == 5
    rest = run_rl("rl-resume", 12, save_every=5)
    assert rest.completed
    resumed = metrics("rl-resume")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [(r["loss"], r["reward"]) for r in resumed] == [(r["loss"], r["reward"]) for r in straight]
