"""Test-session setup: 4 emulated CPU devices (8 can stall XLA's in-process collectives on 2 cores) and a private
$JAXCHAT_HOME, both before anything imports jax."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAXCHAT_HOME", tempfile.mkdtemp(prefix="jaxchat-test-home-"))
