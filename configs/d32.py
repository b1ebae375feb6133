"""The ~$1000 tier (reference run1000.sh): 1.88B parameters, 37.6B tokens."""
from jaxchat.config import default_config


def get_config():
    c = default_config()
    c.depth = 32
    c.device_batch_size = 8  # as the reference: 8 rows x 2048 x 8 GPUs x 4 accumulation steps = 524,288
    return c
