"""jaxchat: train, evaluate and talk to your own small ChatGPT, in JAX."""
