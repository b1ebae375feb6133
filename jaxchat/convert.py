"""Import a nanochat checkpoint, so the public nanochat models can be served and evaluated by jaxchat:

    python -m jaxchat.convert <nanochat checkpoint dir | model_XXXXXX.pt> [--step N] [--run NAME]
                              [--stage base|mid|sft|rl] [--tokenizer tokenizer.pkl | --no-tokenizer]

Reads `model_<step>.pt` (the state_dict) and `meta_<step>.json` (its `model_config`) from a nanochat checkpoint
directory such as `~/.cache/nanochat/chatsft_checkpoints/d20` (newest step unless `--step`), and writes:

    $JAXCHAT_HOME/runs/<run>/<stage>/checkpoints/<step>/   params (plus a placeholder optimizer state)
    $JAXCHAT_HOME/runs/<run>/config.py                      a config that rebuilds exactly this model
    $JAXCHAT_HOME/tokenizer/<run>/                          the tokenizer, converted from nanochat's tokenizer.pkl

after which `python -m jaxchat.chat --config=$JAXCHAT_HOME/runs/<run>/config.py --stage=<stage>`, the evaluators
and serve.py load it like any jaxchat run, and mid/SFT can continue from it.

No torch needed: a `.pt` file is a zip holding a pickle (`data.pkl`) whose tensors point at raw little-endian
storages (`data/<key>`). A restricted unpickler turns those into numpy arrays (bf16 widened exactly to fp32) and
refuses any other object, so nothing in the file is ever executed. Likewise nanochat's `tokenizer.pkl` (a pickled
tiktoken Encoding) is read for its state (split pattern, mergeable ranks, special tokens) without tiktoken.

Both architectures convert: the October 2025 model (nanochat-reference.md §1.2) and the 2026 one (§1.3: value
embeddings, per-layer scalars, smear, backout, sliding windows), whose options `model_options` reads off the state's
keys and the model_config; the 2026 model's constants (q/k x1.2, RoPE base 100,000, vocabulary padded to 64, rotary
tables in the compute dtype) are those of nanochat 92d63d4, the commit tests/fixtures/parity_2026.npz comes from. A key
neither model has is refused by name rather than converted into a model that would silently compute something else.
October's vocabulary padding (rows past `vocab_size`) is dropped, as those rows are never predicted; the 2026 model
keeps its padded rows (its config pads them too).
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import pickle
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

from jaxchat import sharding

STAGE_DIRS = {"base_checkpoints": "base", "mid_checkpoints": "mid", "chatsft_checkpoints": "sft",
              "chatrl_checkpoints": "rl"}
STAGES = ("base", "mid", "sft", "rl")
# The 2026 model's options, by a key that only a model with the option has.
OPTION_KEYS = {"value_embeds": r"^value_embeds\.", "smear": r"^smear_gate\.weight$", "backout": r"^backout_lambda$",
               "layer_scalars": r"^resid_lambdas$"}
# The constants of the 2026 model (nanochat 92d63d4), which no key or model_config field records.
HEAD_CONSTANTS = {"qk_scale": 1.2, "rope_base": 100000.0, "vocab_multiple": 64, "rope_bf16": False, "init": "2026"}


class ConversionError(ValueError):
    """The source cannot be converted faithfully; the message says which file or key and why."""


# ---------------------------------------------------------------- torch .pt files, without torch

def _widen_bf16(raw_u16: np.ndarray) -> np.ndarray:
    # bf16 is the top half of an fp32: shifting it up is exact.
    return (raw_u16.astype(np.uint32) << 16).view(np.float32)


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16, "BFloat16Storage": "bf16",
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_ignored) -> np.ndarray:
    # torch's offset and strides count elements; the storage is already in its final dtype.
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * storage.itemsize for s in stride))
    return np.array(view)  # own, contiguous memory: the storage may be shared by several tensors


def _rebuild_parameter(data, *_ignored):
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Reads tensors and containers; any other global in the pickle is refused, never imported."""

    def __init__(self, file, source: str, load_storage):
        super().__init__(file)
        self._source, self._load_storage = source, load_storage

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"{self._source}: unsupported object {module}.{name} in the pickle (only "
                                     "tensors and dicts are read; nothing in the file is executed)")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self._source}: unsupported persistent id {pid!r}")
        return self._load_storage(str(key), storage_type.dtype, int(numel))


def load_torch_file(path: str | Path) -> dict:
    """A `torch.save` file (zip format, torch >= 1.6) as nested dicts of numpy arrays; bf16 comes back as fp32."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ConversionError(f"{path} is not a zip-format torch checkpoint (torch.save from torch >= 1.6); "
                              "re-save it with a current torch") from None
    with zf:
        pickles = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ConversionError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in zf.namelist() and zf.read(prefix + "byteorder").strip() != b"little":
            raise ConversionError(f"{path} was saved on a big-endian machine; that is not supported")
        cache: dict[str, np.ndarray] = {}

        def load_storage(key: str, dtype, numel: int) -> np.ndarray:
            if key not in cache:
                raw = zf.read(f"{prefix}data/{key}")
                if dtype == "bf16":
                    cache[key] = _widen_bf16(np.frombuffer(raw, np.uint16, count=numel))
                else:
                    cache[key] = np.frombuffer(raw, dtype, count=numel)
            return cache[key]

        return _TorchUnpickler(io.BytesIO(zf.read(pickles[0])), str(path), load_storage).load()


# ---------------------------------------------------------------- the nanochat checkpoint

def find_checkpoint(source: str | Path, step: int | None = None) -> tuple[Path, Path, int]:
    """(model_*.pt, meta_*.json, step) from a checkpoint dir (newest step, or `step`) or a model_*.pt path."""
    source = Path(source).expanduser()
    if source.is_file():
        match = re.fullmatch(r"model_(\d+)\.pt", source.name)
        if not match:
            raise ConversionError(f"{source}: expected a file named model_<step>.pt (with meta_<step>.json beside it)")
        directory, found = source.parent, int(match.group(1))
        if step is not None and step != found:
            raise ConversionError(f"--step={step} but the file given is step {found}")
        step = found
    elif source.is_dir():
        directory = source
        steps = sorted(int(m.group(1)) for p in source.iterdir() if (m := re.fullmatch(r"model_(\d+)\.pt", p.name)))
        if not steps:
            raise ConversionError(f"no model_<step>.pt in {source}: point at a nanochat checkpoint directory, e.g. "
                                  "~/.cache/nanochat/chatsft_checkpoints/d20")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ConversionError(f"no step {step} in {source}; available: {steps}")
    else:
        raise ConversionError(f"{source} does not exist")
    model_path, meta_path = directory / f"model_{step:06d}.pt", directory / f"meta_{step:06d}.json"
    for p in (model_path, meta_path):
        if not p.is_file():
            raise ConversionError(f"{p} is missing: a nanochat checkpoint is model_<step>.pt plus meta_<step>.json")
    return model_path, meta_path, step


def torch_name(path) -> tuple[str, bool]:
    """(nanochat's state_dict key, whether its weight is transposed) of the jaxchat parameter at `path`: the two
    models name their weights alike (ours nest `attn`/`mlp` under `blocks`, theirs under `transformer.h`)."""
    names = sharding.path_names(path)
    if names == ("wte",):
        return "transformer.wte.weight", False
    if names == ("lm_head", "kernel"):
        return "lm_head.weight", True  # torch Linear stores (out, in); our kernels are (in, out)
    if names[0] == "blocks" and names[-1] == "kernel":
        return f"transformer.h.{'.'.join(names[1:-1])}.weight", True
    if names[0] == "value_embeds":  # 2026: embedding tables, (vocab, kv dims) on both sides
        return f"value_embeds.{names[1]}.weight", False
    if names == ("smear_gate", "kernel"):
        return "smear_gate.weight", True
    if len(names) == 1 and names[0] in ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda"):
        return names[0], False
    raise ConversionError(f"no nanochat counterpart for jaxchat parameter {'.'.join(names)}")


def model_options(state: dict, model_config: dict) -> dict:
    """The 2026 options (model.GPTConfig fields) a checkpoint's keys and model_config imply; {} for October's model."""
    options = {name: True for name, pattern in OPTION_KEYS.items() if any(re.search(pattern, k) for k in state)}
    windows = str(model_config.get("window_pattern") or "L")
    if windows.upper() != "L":
        options["window_pattern"] = windows
    if options or "window_pattern" in model_config:  # a 2026-era model (its GPTConfig has window_pattern)
        options.update(HEAD_CONSTANTS)
    return options


def expected_keys(model_config: dict, options: dict | None = None) -> set[str]:
    """Every state_dict key the model `model_config` (with the 2026 `options`) has: one per jaxchat parameter."""
    import jax

    from jaxchat import model

    _, abstract = model.abstract_params(gpt_config(model_config, options))
    return {torch_name(path)[0] for path, _ in jax.tree_util.tree_leaves_with_path(abstract)}


def check_architecture(state: dict, model_config: dict, source: str = "checkpoint") -> None:
    """Raise ConversionError unless `state` is exactly the model that `model_config` and its keys describe."""
    for field in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
        if field not in model_config:
            raise ConversionError(f"{source}: model_config has no {field!r}; is this a nanochat meta_*.json?")
    windows = str(model_config.get("window_pattern") or "L")
    if not set(windows.upper()) <= {"S", "L"}:
        raise ConversionError(f"{source}: window_pattern={windows!r} has letters other than S and L")
    expected = expected_keys(model_config, model_options(state, model_config))
    extra = sorted(set(state) - expected)
    if extra:
        listing = ", ".join(extra[:6]) + (f", ... ({len(extra)} in all)" if len(extra) > 6 else "")
        raise ConversionError(
            f"{source}: key {extra[0]!r} is a parameter neither the October 2025 nor the 2026 nanochat model "
            "jaxchat implements has; converting without it would silently compute something else. Unsupported "
            f"keys: {listing}")
    missing = sorted(expected - set(state))
    if missing:
        raise ConversionError(f"{source}: key {missing[0]!r} is missing ({len(missing)} expected keys absent); not a "
                              f"complete nanochat GPT with {model_config['n_layer']} layers")


def gpt_config(model_config: dict, options: dict | None = None):
    from jaxchat.model import GPTConfig

    return GPTConfig(vocab_size=model_config["vocab_size"], n_layer=model_config["n_layer"],
                     n_head=model_config["n_head"], n_kv_head=model_config["n_kv_head"],
                     n_embd=model_config["n_embd"], sequence_len=model_config["sequence_len"], **(options or {}))


def convert_params(state: dict, model_config: dict, source: str = "checkpoint") -> dict:
    """nanochat state_dict (torch names, (out, in) weights) -> jaxchat's params pytree of fp32 numpy arrays."""
    import jax

    from jaxchat import model

    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # saved from a torch.compile'd model
    check_architecture(state, model_config, source)
    cfg = gpt_config(model_config, model_options(state, model_config))
    vocab = cfg.padded_vocab
    _, abstract = model.abstract_params(cfg)

    def one(path, target):
        key, transpose = torch_name(path)
        weight = np.asarray(state[key], np.float32)
        if key in ("transformer.wte.weight", "lm_head.weight") or key.startswith("value_embeds."):
            if weight.shape[0] < vocab:
                raise ConversionError(f"{source}: {key} has {weight.shape[0]} rows, fewer than the model's {vocab}")
            weight = weight[:vocab]  # October's padded rows (vocab rounded up to a multiple of 64) are never predicted
        weight = weight.T if transpose else weight
        if weight.shape != target.shape:
            raise ConversionError(f"{source}: {key} has shape {state[key].shape}, which does not fit jaxchat's "
                                  f"{'.'.join(sharding.path_names(path))} {target.shape} for model_config {model_config}")
        return np.ascontiguousarray(weight)

    return jax.tree_util.tree_map_with_path(one, abstract)


def jaxchat_config(model_config: dict, run: str, options: dict | None = None):
    """A full jaxchat config (the d20 recipe's training fields) whose model is exactly this one."""
    from jaxchat.config import default_config

    c = default_config()
    c.run = run
    c.tokenizer = run
    c.depth = model_config["n_layer"]
    c.model_dim = model_config["n_embd"]
    c.n_head = model_config["n_head"]
    c.n_kv_head = model_config["n_kv_head"]
    c.head_dim = model_config["n_embd"] // model_config["n_head"]
    c.vocab_size = model_config["vocab_size"]
    c.sequence_len = model_config["sequence_len"]
    for key, value in (options or {}).items():
        c[key] = value
    return c


_CONFIG_FIELDS = ("run", "tokenizer", "depth", "model_dim", "n_head", "n_kv_head", "head_dim", "vocab_size",
                  "sequence_len", "rope_base", *HEAD_CONSTANTS, *OPTION_KEYS, "window_pattern")


def config_source(config, origin: str) -> str:
    lines = [f'"""Written by `python -m jaxchat.convert` for a model imported from {origin}."""',
             "from jaxchat.config import default_config", "", "", "def get_config():", "    c = default_config()"]
    lines += [f"    c.{k} = {config[k]!r}" for k in dict.fromkeys(_CONFIG_FIELDS)]
    return "\n".join(lines + ["    return c", ""])


# ---------------------------------------------------------------- the tokenizer

class _EncodingState:
    """Stands in for tiktoken.Encoding while unpickling: keeps the state tiktoken would rebuild itself from."""

    def __setstate__(self, state):
        self.state = state


class _TokenizerUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"{self._source}: unsupported object {module}.{name} in the pickle; expected a "
                                     "pickled tiktoken Encoding (nanochat's tokenizer.pkl)")


def load_tiktoken_state(path: str | Path) -> dict:
    """{name, pat_str, mergeable_ranks, special_tokens} of a pickled tiktoken Encoding."""
    with open(path, "rb") as f:
        obj = _TokenizerUnpickler(f, str(path)).load()
    state = getattr(obj, "state", None)
    if isinstance(state, str):
        raise ConversionError(f"{path} refers to tiktoken's registered encoding {state!r} instead of holding its "
                              "merges; only tokenizers trained by nanochat (rustbpe) can be converted")
    if not isinstance(state, dict) or not {"pat_str", "mergeable_ranks", "special_tokens"} <= state.keys():
        raise ConversionError(f"{path} is not a pickled tiktoken Encoding")
    return state


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merge loop over `token` using only ranks below `max_rank`: the two parts it is built from."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def convert_tokenizer(state: dict, source: str = "tokenizer.pkl"):
    """A jaxchat Tokenizer with the same ids: tiktoken's ranks become the HF BPE vocabulary, each multi-byte token's
    merge is recovered by replaying BPE below its rank (merge order = rank order), and the 9 specials stay last."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from jaxchat.tokenizer import SPECIAL_TOKENS, Tokenizer, bytes_to_unicode

    ranks: dict[bytes, int] = state["mergeable_ranks"]
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise ConversionError(f"{source}: token ranks are not the contiguous ids 0..{n - 1}")
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise ConversionError(f"{source}: byte {missing_bytes[0]} has no token; a byte-level BPE needs all 256")
    wanted = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    if dict(state["special_tokens"]) != wanted:
        raise ConversionError(f"{source}: special tokens {state['special_tokens']} differ from jaxchat's, which must "
                              f"be {wanted} (nanochat's 9 chat specials as the last ids)")
    table = bytes_to_unicode()
    spell = lambda b: "".join(table[x] for x in b)  # noqa: E731
    vocab = {spell(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = _bpe_parts(ranks, token, rank)
        if len(parts) != 2:
            raise ConversionError(f"{source}: token {token!r} (id {rank}) is not the merge of two lower-ranked "
                                  "tokens; not a BPE vocabulary")
        merges.append((spell(parts[0]), spell(parts[1])))
    vocab.update(wanted)  # in the BPE vocabulary but produced by no merge: ids only, as jaxchat's own tokenizer
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(state["pat_str"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    return Tokenizer(hf)


def _save_tokenizer(tok, directory: Path) -> Path:
    """Save, unless the same tokenizer is already there; a different one is never overwritten."""
    from jaxchat.tokenizer import Tokenizer

    if (directory / "tokenizer.json").is_file():
        have = Tokenizer.load(directory)
        same = have.vocab_size == tok.vocab_size and all(
            have.token_to_bytes(i) == tok.token_to_bytes(i) for i in range(tok.vocab_size))
        if not same:
            raise ConversionError(f"{directory} already holds a different tokenizer; pick another --run")
        return directory
    return tok.save(directory)


# ---------------------------------------------------------------- the command

def infer_stage(directory: Path) -> str | None:
    for part in (directory.name, directory.parent.name):
        if part in STAGE_DIRS:
            return STAGE_DIRS[part]
    return None


def default_tokenizer_path(directory: Path) -> Path | None:
    """nanochat keeps one tokenizer per base dir: <base>/tokenizer/tokenizer.pkl beside <base>/<stage>_checkpoints/."""
    for candidate in (directory / "tokenizer.pkl", directory.parent.parent / "tokenizer" / "tokenizer.pkl"):
        if candidate.is_file():
            return candidate
    return None


def convert(source, *, step=None, run=None, stage=None, tokenizer="auto", log=print) -> dict:
    """Convert one nanochat checkpoint (and its tokenizer); returns where everything went."""
    import jax
    import jax.numpy as jnp

    from jaxchat import paths
    from jaxchat.checkpoint import Checkpointer
    from jaxchat.tokenizer import config_dir

    model_path, meta_path, step = find_checkpoint(source, step)
    directory = model_path.parent
    stage = stage or infer_stage(directory)
    if stage not in STAGES:
        raise ConversionError(f"cannot tell the stage from {directory}; pass --stage=base|mid|sft|rl")
    run = run or f"nanochat-{directory.name}"
    meta = json.loads(meta_path.read_text())
    model_config = meta.get("model_config")
    if not isinstance(model_config, dict):
        raise ConversionError(f"{meta_path} has no model_config; is this a nanochat meta_*.json?")

    state = load_torch_file(model_path)
    if not isinstance(state, dict):
        raise ConversionError(f"{model_path} holds a {type(state).__name__}, not a state_dict")
    params = convert_params(state, model_config, str(model_path))
    config = jaxchat_config(model_config, run, model_options(state, model_config))
    out = {"run": run, "stage": stage, "step": step}
    ckpt_dir = paths.run_dir(run, stage) / "checkpoints"
    existing = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if ckpt_dir.is_dir() else []
    if existing and step not in existing:
        raise ConversionError(f"{ckpt_dir} already holds checkpoints {existing} (another model, or this run trained "
                              "further); pick another --run")

    tok_path = default_tokenizer_path(directory) if tokenizer == "auto" else tokenizer
    if tok_path:
        tok = convert_tokenizer(load_tiktoken_state(tok_path), str(tok_path))
        if tok.vocab_size != config.vocab_size:
            raise ConversionError(f"{tok_path} has {tok.vocab_size:,} ids but the model's vocab_size is "
                                  f"{config.vocab_size:,}: they are not from the same nanochat run")
        out["tokenizer"] = _save_tokenizer(tok, config_dir(config))
        log(f"tokenizer: {tok_path} -> {out['tokenizer']} ({tok.vocab_size:,} ids)")
    elif tokenizer == "auto":
        log(f"tokenizer: none found beside {directory}; pass --tokenizer=<nanochat base dir>/tokenizer/tokenizer.pkl "
            f"(chat, eval and serve need one at {config_dir(config)})")

    config_path = paths.run_dir(run) / "config.py"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(config_source(config, str(model_path.resolve())))
    out["config"] = config_path

    device = jax.devices()[0]
    params = jax.tree.map(lambda x: jax.device_put(jnp.asarray(x), device), params)
    # No optimizer state comes across; the placeholder's name tells a resumed training run why it cannot resume.
    placeholder = {"converted_from_nanochat_no_optimizer_state": jnp.zeros((), jnp.int32)}
    metrics = {k: meta[k] for k in ("val_bpb",) if isinstance(meta.get(k), (int, float))}
    with Checkpointer(ckpt_dir, async_save=False) as ckpt:
        saved = ckpt.save(step, params=params, opt_state=placeholder, rng=jax.random.key(0), data_state={},
                          config=config.to_dict(), metrics=metrics)
    out["checkpoint"] = ckpt_dir / str(step)
    log(f"model: {model_path} -> {out['checkpoint']}" + ("" if saved else " (already there, left as it was)"))
    log(f"config: {config_path}\nnext: python -m jaxchat.chat --config={config_path} --stage={stage}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxchat.convert",
                                 description="Import a nanochat checkpoint (and its tokenizer) as a jaxchat run.")
    ap.add_argument("source", help="a nanochat checkpoint directory (e.g. ~/.cache/nanochat/chatsft_checkpoints/d20) "
                                   "or one of its model_<step>.pt files")
    ap.add_argument("--step", type=int, default=None, help="which step (default: the newest)")
    ap.add_argument("--run", default=None, help="jaxchat run name (default: nanochat-<model tag>)")
    ap.add_argument("--stage", choices=STAGES, default=None,
                    help="jaxchat stage to file it under (default: from the directory, e.g. chatsft_checkpoints -> sft)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--tokenizer", default="auto", help="nanochat tokenizer.pkl (default: looked up beside the "
                                                           "checkpoint, in <base>/tokenizer/)")
    group.add_argument("--no-tokenizer", action="store_const", const=None, dest="tokenizer")
    args = ap.parse_args(argv)
    try:
        convert(args.source, step=args.step, run=args.run, stage=args.stage, tokenizer=args.tokenizer)
    except (ValueError, pickle.UnpicklingError, FileNotFoundError) as e:  # ConversionError, and orbax's refusals
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
