"""The lent GPU's Python image, imitated: grain, fastapi, uvicorn and ml_collections are not installed there.

Put this folder on PYTHONPATH and Python imports it at start-up: every import of a name in JAXCHAT_BLOCK_IMPORTS
(comma-separated top-level packages) fails as if the package were absent, except where JAXCHAT_CARRIED names a folder
that holds it, as `pip install --target` of a carried wheel would (bench/gpu_check.py installs ml_collections so).
"""
import importlib.abc
import importlib.machinery
import os
import sys

_BLOCKED = {name for name in os.environ.get("JAXCHAT_BLOCK_IMPORTS", "").split(",") if name}
_CARRIED = os.environ.get("JAXCHAT_CARRIED", "")


class _ImageFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top not in _BLOCKED:
            return None
        if _CARRIED:
            search = [_CARRIED] if name == top else path
            spec = importlib.machinery.PathFinder.find_spec(name, search)
            if spec is not None and spec.origin and spec.origin.startswith(_CARRIED):
                return spec
        raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU image)", name=name)


if _BLOCKED:
    sys.meta_path.insert(0, _ImageFinder())
