"""The reference $100 speedrun model (nanochat, October 2025): 561M parameters, 11.2B tokens on 8xH100."""
from jaxchat.config import default_config


def get_config():
    c = default_config()
    c.depth = 20
    return c
