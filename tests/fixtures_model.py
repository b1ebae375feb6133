"""Random weights for tests: `model.init` zero-initialises the projections and the head, which would make every logit
equal and every greedy decode the same token."""
import jax

from jaxchat import model


def random_params(cfg, seed: int = 1, scale: float = 0.3):
    """(graphdef, params) with every weight ~ N(0, scale²)."""
    graphdef, params = model.init(cfg)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return graphdef, treedef.unflatten([scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
