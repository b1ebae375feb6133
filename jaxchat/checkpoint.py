"""Checkpoints: orbax `CheckpointManager` plus an integrity manifest of our own.

One step directory per save, `<run_dir>/checkpoints/<step>/`, holding three orbax items:

    params/      the model's parameter pytree (any sharding; restored onto whatever mesh the caller asks for)
    opt_state/   the optax state pytree (tuples, namedtuples and MaskedNodes survive because restore takes a target)
    meta/        JSON: step, config, data-iterator state, metrics, the RNG key's raw data and implementation
    jaxchat_manifest.json   size and CRC-32 of every file above, written once orbax has finalised the step

Why a manifest: orbax writes to a tmp dir and renames it, so an interrupted save never looks finished, but it
does not checksum array data. Measured with orbax 0.12.8: truncating or zeroing a data file fails the read,
yet one flipped byte inside a data file restores silently with wrong values, and a deleted `_METADATA` or a
truncated per-process OCDBT manifest restores without complaint. The manifest catches all of these.

A step counts as valid only once sealed (manifest present and matching). `restore()` walks back from the
newest step, warns about each damaged one, moves it to `_damaged/` (so later saves of the same step numbers
are not silently refused by orbax) and restores the newest good one; with none good it raises.

Trained weights are read through `load_params` / `load_model` only (chat, serve, evaluate, the next stage's start):
params alone, on one device or FSDP-sharded over a mesh exactly as training holds them.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxchat import paths
from jaxchat.sharding import path_names

MANIFEST = "jaxchat_manifest.json"
DAMAGED_DIR = "_damaged"
TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax's suffix for a step that was never finalised
_ITEMS = ("params", "opt_state", "meta")
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used (damaged, unsealed, or from an incompatible model)."""


class IncompatibleCheckpointError(ValueError):
    """The checkpoint is intact but was saved from a different model or optimizer layout."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped in favour of an older one."""


@dataclasses.dataclass(frozen=True)
class StepStatus:
    step: int
    ok: bool
    reason: str | None = None  # why the step is not usable; None when ok


@dataclasses.dataclass
class Restored:
    step: int
    params: Any
    opt_state: Any  # None when the caller did not ask for it
    rng: jax.Array
    data_state: Any
    config: dict
    metrics: dict


# ---------------------------------------------------------------- manifest (integrity)

def _crc32(path: Path) -> int:
    # CRC-32 rather than SHA: this guards against torn writes and bit rot, not adversaries, and zlib's CRC runs
    # ~1.6x faster than sha256 here while releasing the GIL, so sealing does not stall the training thread.
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _data_files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(step_dir: Path) -> None:
    """Record size and CRC-32 of every file in a finalised step dir; the write is atomic (tmp + rename)."""
    step_dir = Path(step_dir)
    files = {str(p.relative_to(step_dir)): [p.stat().st_size, _crc32(p)] for p in _data_files(step_dir)}
    tmp = step_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": 1, "files": files}, indent=0))
    os.replace(tmp, step_dir / MANIFEST)


def check_step_dir(step_dir: Path, *, verify: bool) -> str | None:
    """Why `step_dir` is not a usable checkpoint, or None if it is.

    verify=False compares file sizes only (cheap, for listings); verify=True also re-reads every byte.
    """
    step_dir = Path(step_dir)
    try:
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return "not sealed: no integrity manifest (the save was interrupted before it was verified)"
    except (ValueError, KeyError, TypeError) as e:
        return f"integrity manifest unreadable ({type(e).__name__}: {e})"
    missing = [name for name in _ITEMS if not (step_dir / name).is_dir()]
    if missing:
        return f"item directory missing: {', '.join(missing)}"
    for rel, (size, crc) in files.items():
        path = step_dir / rel
        if not path.is_file():
            return f"file missing: {rel}"
        if path.stat().st_size != size:
            return f"file size changed: {rel} is {path.stat().st_size} bytes, {size} when saved (truncated?)"
        if verify and _crc32(path) != crc:
            return f"checksum mismatch: {rel} (contents changed since the save)"
    return None


# ---------------------------------------------------------------- directory reading (no arrays)

def _item_handlers() -> dict:
    return {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()}


def open_read_only(directory: Path) -> ocp.CheckpointManager:
    """A manager that never writes, creates or cleans anything (for `inspect` and other readers)."""
    return ocp.CheckpointManager(Path(directory).absolute(), item_handlers=_item_handlers(),
                                 options=ocp.CheckpointManagerOptions(read_only=True))


def unfinished_saves(directory: Path) -> list[Path]:
    """Step dirs orbax never finalised (a save killed mid-way); orbax ignores them."""
    directory = Path(directory)
    return sorted(p for p in directory.iterdir() if TMP_MARKER in p.name) if directory.is_dir() else []


def step_statuses(manager: ocp.CheckpointManager, *, verify: bool = False) -> list[StepStatus]:
    """Every finalised step, oldest first, with whether it is usable."""
    out = []
    for step in manager.all_steps():
        reason = check_step_dir(Path(manager.directory) / str(step), verify=verify)
        out.append(StepStatus(step, reason is None, reason))
    return out


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def leaf_shapes(tree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """`{dotted.path: (shape, dtype)}` for arrays, ShapeDtypeStructs or orbax ArrayMetadata alike.

    Empty nodes (optax MaskedNode, EmptyState; None in orbax's metadata) have no leaves, so a target tree and
    the metadata of the checkpoint it was saved from flatten to the same paths.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {".".join(path_names(p)): (tuple(x.shape), np.dtype(x.dtype)) for p, x in flat if hasattr(x, "shape")}


def item_shapes(manager: ocp.CheckpointManager, step: int, item: str) -> dict:
    """Shapes and dtypes of one array item, read from orbax's metadata without touching array data."""
    md = manager.item_metadata(step)[item]
    if md is None:
        raise CheckpointError(f"step {step} has no metadata for item {item!r}")
    return leaf_shapes(getattr(md, "tree", md))  # newer orbax wraps the tree in TreeMetadata


# ---------------------------------------------------------------- restore helpers

def _abstract(tree):
    """ShapeDtypeStructs that carry a sharding; concrete arrays are accepted and described by their own."""
    def one(x):
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            raise ValueError(
                "restore targets need a sharding on every leaf: build them with jax.eval_shape and attach the "
                "run's shardings, e.g. jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, "
                "sharding=sh), abstract, shardings)")
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree.map(one, tree)


def _check_compatible(saved: dict, wanted: dict, item: str, step: int) -> None:
    # A config change between save and restore is not damage: say so instead of falling back step after step.
    problems = [f"{k}: missing from checkpoint" for k in wanted.keys() - saved.keys()]
    problems += [f"{k}: in checkpoint but not in the model" for k in saved.keys() - wanted.keys()]
    problems += [f"{k}: saved {saved[k][0]} {saved[k][1]}, expected {wanted[k][0]} {wanted[k][1]}"
                 for k in wanted.keys() & saved.keys() if saved[k] != wanted[k]]
    if problems:
        listing = "; ".join(sorted(problems)[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise IncompatibleCheckpointError(
            f"checkpoint step {step} {item} does not match the model being restored ({listing}). The config "
            "changed since this run was saved: restore with the original config or start a new run "
            "(--config.run=<new name>).")


def _rng_record(rng) -> dict:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return {"impl": str(jax.random.key_impl(rng)), "data": np.asarray(jax.random.key_data(rng)).tolist()}
    return {"impl": None, "data": np.asarray(rng).tolist()}  # a legacy raw uint32 key


def _replicated_like(abstract_params) -> jax.sharding.Sharding | None:
    # The key must live where the params live: fully replicated on the same mesh, or the same single device.
    leaves = jax.tree.leaves(abstract_params)
    if not leaves:
        return None
    sharding = leaves[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding


def _rng_from_record(record: dict, sharding) -> jax.Array:
    data = np.asarray(record["data"], dtype=np.uint32)
    data = jax.device_put(data, sharding) if sharding is not None else jnp.asarray(data)
    return jax.random.wrap_key_data(data, impl=record["impl"]) if record["impl"] else data


def _json_checked(name: str, value) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint field {name!r} must be JSON-serialisable ({e}); convert it first "
                        "(ConfigDict.to_dict(), plain ints/floats instead of arrays)") from None
    return value


# ---------------------------------------------------------------- the checkpointer

class Checkpointer:
    """Save and restore training state under one directory (normally `paths.run_dir(run, stage) / "checkpoints"`).

    `save` returns once arrays are copied off the devices (so the caller may donate its buffers); writing,
    orbax's finalisation and our manifest happen on background threads. Call `wait()` before exit.
    """

    def __init__(self, directory, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._async = async_save
        leftovers = unfinished_saves(self.directory)
        if leftovers:
            warnings.warn(f"removing unfinished checkpoint saves (interrupted mid-write): "
                          f"{', '.join(p.name for p in leftovers)}", CheckpointWarning, stacklevel=2)
        self._mngr = ocp.CheckpointManager(
            self.directory, item_handlers=_item_handlers(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 cleanup_tmp_directories=True, create=True))
        self._seal_thread: threading.Thread | None = None
        self._seal_error: BaseException | None = None

    # -- saving

    def save(self, step: int, *, params, opt_state, rng, data_state, config: dict, metrics: dict | None = None) -> bool:
        """Checkpoint `step`. Returns False (and does nothing) if that step is already saved."""
        step = int(step)
        self._finish_sealing()
        existing = self._mngr.all_steps()
        if step in existing:
            return False
        if existing and step < max(existing):
            raise ValueError(f"cannot save step {step}: {self.directory} already has step {max(existing)}. "
                             "Resume from the latest checkpoint, or start a new run (--config.run=<new name>).")
        meta = {"step": step, "config": _json_checked("config", config),
                "data_state": _json_checked("data_state", data_state),
                "metrics": _json_checked("metrics", metrics or {}), "rng": _rng_record(rng)}
        self._mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)))
        if jax.process_index() != 0:
            return True  # the primary process seals; every process can verify (the check reads files only)
        if self._async:
            self._seal_thread = threading.Thread(target=self._seal, args=(step,), name=f"seal-{step}", daemon=True)
            self._seal_thread.start()
        else:
            self._seal(step)
            self._raise_seal_error()
        return True

    def _seal(self, step: int) -> None:
        try:
            self._mngr.wait_until_finished()
            step_dir = self.directory / str(step)
            if not step_dir.is_dir():
                raise CheckpointError(f"orbax did not finalise step {step} in {self.directory} (see its log above)")
            write_manifest(step_dir)
        except BaseException as e:  # re-raised on the caller's thread by wait()/save()
            self._seal_error = e

    def _finish_sealing(self) -> None:
        if self._seal_thread is not None:
            self._seal_thread.join()
            self._seal_thread = None
        self._raise_seal_error()

    def _raise_seal_error(self) -> None:
        if self._seal_error is not None:
            e, self._seal_error = self._seal_error, None
            raise CheckpointError(f"checkpoint save in {self.directory} failed: {e}") from e

    def wait(self) -> None:
        """Block until every pending save is written, finalised and sealed."""
        self._mngr.wait_until_finished()
        self._finish_sealing()

    def close(self) -> None:
        self.wait()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- reading

    def steps(self, *, verify: bool = False) -> list[StepStatus]:
        self.wait()
        self._mngr.reload()
        return step_statuses(self._mngr, verify=verify)

    def latest_step(self) -> int | None:
        """Newest step that passes the cheap check (manifest, files, sizes); None when there are no checkpoints.

        Raises CheckpointError when checkpoints exist but none passes: starting from scratch then would
        silently discard a run.
        """
        statuses = self.steps()
        good = [s.step for s in statuses if s.ok]
        if good:
            return good[-1]
        if statuses:
            raise CheckpointError(self._none_usable([(s.step, s.reason) for s in statuses]))
        return None

    def restore(self, step: int | None = None, *, abstract_params, abstract_opt_state=None,
                verify: bool = True) -> Restored:
        """Restore `step` (default: the newest good one, falling back past damaged ones with a warning).

        `abstract_*` are pytrees of ShapeDtypeStructs with `sharding=` set: arrays land on those shardings,
        whatever mesh they were saved from. Leave `abstract_opt_state` out to load params only (evaluation,
        the next stage). `verify` re-reads every file against the manifest before restoring; verify=False
        trusts the files (orbax's own read errors still count as damage) and accepts an unsealed step.
        """
        abstract_params = _abstract(abstract_params)
        abstract_opt_state = None if abstract_opt_state is None else _abstract(abstract_opt_state)
        statuses = self.steps()
        if step is not None:
            if step not in [s.step for s in statuses]:
                raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                        f"available: {[s.step for s in statuses]}")
            try:
                return self._restore_step(int(step), abstract_params, abstract_opt_state, verify)
            except CheckpointError as e:
                raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: {e}") from e
        if not statuses:
            raise FileNotFoundError(f"no checkpoints in {self.directory}")
        damaged = []
        for i, s in enumerate(reversed(statuses)):
            try:
                restored = self._restore_step(s.step, abstract_params, abstract_opt_state, verify)
            except CheckpointError as e:
                left = "trying the previous one" if i + 1 < len(statuses) else "no older checkpoint left"
                warnings.warn(f"checkpoint step {s.step} in {self.directory} is damaged: {e}; {left}",
                              CheckpointWarning, stacklevel=2)
                damaged.append((s.step, str(e)))
                continue
            self._set_aside([d for d, _ in damaged])
            return restored
        raise CheckpointError(self._none_usable(damaged))

    def _restore_step(self, step: int, abstract_params, abstract_opt_state, verify: bool) -> Restored:
        """Restore one step; damage of any kind is raised as CheckpointError(reason)."""
        try:
            reason = check_step_dir(self.directory / str(step), verify=True) if verify else None
            if reason is not None:
                raise CheckpointError(reason)
            _check_compatible(item_shapes(self._mngr, step, "params"), leaf_shapes(abstract_params), "params", step)
            args = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
            if abstract_opt_state is not None:
                _check_compatible(item_shapes(self._mngr, step, "opt_state"), leaf_shapes(abstract_opt_state),
                                  "opt_state", step)
                args["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
            out = self._mngr.restore(step, args=ocp.args.Composite(**args))
            meta = out["meta"]
            rng = _rng_from_record(meta["rng"], _replicated_like(abstract_params))
        except (IncompatibleCheckpointError, CheckpointError):
            raise
        except Exception as e:  # tensorstore / orbax / JSON read failures: the bytes on disk are bad
            raise CheckpointError(f"{type(e).__name__}: {str(e)[:300]}") from e
        return Restored(step=step, params=out["params"], opt_state=out["opt_state"] if abstract_opt_state else None,
                        rng=rng, data_state=meta["data_state"], config=meta["config"], metrics=meta["metrics"])

    def _set_aside(self, steps: list[int]) -> None:
        # Orbax refuses (silently) to save any step <= its latest one, so damaged newer steps must leave the
        # directory or the resumed run would never checkpoint again until it passed them. Kept, not deleted.
        if not steps or jax.process_index() != 0:
            return
        dest_root = self.directory / DAMAGED_DIR
        dest_root.mkdir(exist_ok=True)
        for step in steps:
            dest = dest_root / str(step)
            n = 1
            while dest.exists():
                dest, n = dest_root / f"{step}.{n}", n + 1
            shutil.move(self.directory / str(step), dest)
            warnings.warn(f"moved damaged checkpoint step {step} to {dest}", CheckpointWarning, stacklevel=3)
        self._mngr.reload()

    def _none_usable(self, damaged: list[tuple[int, str]]) -> str:
        listing = "\n".join(f"  step {s}: {r}" for s, r in sorted(damaged, reverse=True))
        aside = self.directory / DAMAGED_DIR
        if aside.is_dir():
            listing += f"\n  set aside earlier in {aside}: {', '.join(sorted(p.name for p in aside.iterdir()))}"
        return (f"no usable checkpoint in {self.directory}:\n{listing}\n"
                "Refusing to start from scratch. Move the directory away to start a new run, or restore an "
                "explicit step with verify=False if you trust it.")


# ---------------------------------------------------------------- trained weights

MODEL_STAGES = ("base", "mid", "sft", "rl")  # the stages that leave a model behind


def load_params(config, stage: str, *, step: int | None = None, mesh=None) -> tuple[Any, int]:
    """(params, step) of `stage`'s checkpoint of `config.run`: the newest good step, or `step`; no optimizer state.

    With `mesh` every weight lands split as training holds it (`sharding.param_shardings`, FSDP over the mesh), so a
    model too big for one device loads and every device works; without, whole on this process's first device.
    FileNotFoundError naming the command that trains the stage when it has no checkpoint; a damaged or mismatched
    one raises as `Checkpointer.restore` does.
    """
    from jaxchat import model, sharding  # here: flax is not needed to list or verify checkpoints (inspect)
    from jaxchat.config import command, model_config

    directory = paths.run_dir(config.run, stage) / "checkpoints"
    # Checked before opening: the Checkpointer would create the directory of a stage that never ran.
    if not directory.is_dir() or not any(p.name.isdigit() for p in directory.iterdir()):
        raise FileNotFoundError(f"no {stage} checkpoint in {directory} — train one with "
                                f"`{command(config, 'train.py', f'--stage={stage}')}`")
    _, abstract = model.abstract_params(model_config(config))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    else:
        shardings = sharding.param_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    with Checkpointer(directory, async_save=False) as ckpt:
        restored = ckpt.restore(step, abstract_params=abstract)
    return restored.params, restored.step


def load_model(config, stage: str, *, step: int | None = None, mesh=None):
    """(GPTConfig, params, step, tokenizer) for a reader of a trained model (chat, serve, evaluate): `load_params`,
    plus the config's tokenizer (`tokenizer.load_for_config`, which refuses one that does not fit the model)."""
    from jaxchat.config import model_config
    from jaxchat.tokenizer import load_for_config

    try:
        params, step = load_params(config, stage, step=step, mesh=mesh)
    except FileNotFoundError as e:  # the reader chose the stage, and another one may have weights
        raise FileNotFoundError(f"{e} (or pick another stage with --stage={'|'.join(MODEL_STAGES)})") from None
    return model_config(config), params, step, load_for_config(config)
