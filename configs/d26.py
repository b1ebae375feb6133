"""The ~$300 tier: 1.08B parameters, slightly above GPT-2 (1.5B) on CORE in the reference."""
from jaxchat.config import default_config


def get_config():
    c = default_config()
    c.depth = 26
    c.device_batch_size = 16  # 80 GB cards run out of memory at 32 rows of 2048 for this width
    return c
