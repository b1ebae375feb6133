"""The embedded default: a 4-layer, 256-wide GPT on the generated corpus, end to end offline on a CPU in minutes."""
from jaxchat.config import default_config


def get_config():
    c = default_config()
    c.depth = 4
    c.head_dim = 64  # 256 wide -> 4 heads
    c.vocab_size = 1536  # the generated corpus supports ~1,900 merges; a small head also keeps the CPU run fast
    c.sequence_len = 256
    c.device_batch_size = 16
    c.total_batch_size = -1  # one micro-batch per device, no accumulation
    c.num_iterations = 300
    c.compute_dtype = "float32"  # CPUs have no fast bf16 matmul
    c.remat = "none"  # a 4-layer model's activations are small; recomputing them cost 14% per step on 2 cores
    c.muon_momentum_warmup = 50
    c.eval_every = 50
    c.eval_tokens = 16 * 256 * 8
    c.sample_every = 100
    c.save_every = 100
    c.log_every = 1
    c.dataset = "tiny"
    c.packing = "bestfit"  # kept from before `packing` existed, so the tiny run's recorded results still hold
    c.allow_repeat = True  # best-fit loses ~45% of this corpus at T=256 (its long docs): 300 steps read ~1.2 epochs
    c.tokenizer_max_chars = 20_000_000
    # Offline evaluation: CORE and the hub's chat tasks need downloads, so the tiny run evaluates the synthetic tasks.
    c.eval.base_tasks = ""
    c.eval.chat_tasks = "TinySpellingBee,Arithmetic,TinyQuiz"
    c.eval.max_problems = 64
    c.eval.max_tokens = 128
    # Chat stages on the synthetic mixture (tasks/mixtures.py), with the tiny model's batch and context.
    for stage in (c.mid, c.sft):
        stage.mixture = "tiny"
        stage.eval_every = 50
        stage.sample_every = 1000  # samples at the end of the stage
    c.sft.device_batch_size = 16
    c.sft.layout = "packed"  # not d20's padded rows: the tiny figures (README, bench/RESULTS.md) were measured packed
    c.sft.metric_tasks = "TinyQuiz"
    c.sft.metric_every = 50
    c.sft.metric_max_problems = 128
    # RL on the synthetic arithmetic (a checkable answer, like GSM8K): 8 questions x 8 samples per step.
    c.rl.task = "Arithmetic"
    c.rl.num_iterations = 40
    c.rl.examples_per_step = 8
    c.rl.num_samples = 8
    c.rl.max_new_tokens = 48
    c.rl.sequence_len = 128
    c.rl.device_batch_size = 16
    c.rl.save_every = 20
    c.rl.metric_every = 20
    c.rl.metric_problems = 64
    c.rl.metric_samples = 4
    return c
