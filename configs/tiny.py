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
    c.muon_momentum_warmup = 50
    c.eval_every = 50
    c.eval_tokens = 16 * 256 * 8
    c.sample_every = 100
    c.save_every = 100
    c.log_every = 1
    c.dataset = "tiny"
    c.tokenizer_max_chars = 20_000_000
    return c
