"""The depth dial: everything about a run is derived from a handful of choices, here and only here.

A config file (`configs/*.py`) states choices (depth, batch, data set, ...) in an `ml_collections.ConfigDict`;
`derive(config, n_devices)` turns them into every number the run uses: width, heads, parameter count, FLOPs per
token, learning rates, gradient accumulation and the training horizon. Nothing allocates weights, so

    python -m jaxchat.config --config=configs/d20.py [--config.depth=26 ...]

prints a d20's numbers instantly on a laptop. The rules are the reference's (nanochat, October 2025):

- `model_dim = depth * aspect_ratio` rounded up to a multiple of `head_dim` (exact for d20/d26/d32), heads of 128,
  `n_kv_head = n_head` unless set (GQA/MQA), vocab 65,536, sequence 2,048.
- AdamW learning rates were tuned at width 768 and scale as `(model_dim / 768) ** -0.5`; Muon's is not scaled.
- The horizon is `target_param_data_ratio * params / total_batch_size` steps (Chinchilla's 20 tokens per parameter).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
from typing import Any

from ml_collections import ConfigDict, FieldReference

from jaxchat.data.datasets import ShardNeed

# The 2026 recipe (nanochat's time-to-GPT-2 record, configs/d24.py) as the fields it changes, once, so that every
# config and test of it says the same: its model, and its optimizer with base_train's 2026 schedules and transfer.
MODEL_2026 = dict(window_pattern="SSSL", value_embeds=True, smear=True, backout=True, layer_scalars=True,
                  qk_scale=1.2, rope_base=100000.0, rope_bf16=False, vocab_multiple=64, init="2026")
OPTIMIZER_2026 = dict(
    optimizer="2026", embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5, grad_clip=0.0,
    muon_coefficients="polar_express", muon_equilibrate=True, muon_plus=True, muon_normuon_beta2=0.9,
    muon_weight_decay=0.28, muon_momentum_start=0.85, muon_momentum_end=0.97, muon_momentum_warmup=400,
    muon_momentum_final=0.90, warmup_steps=40, warmdown_ratio=0.65, final_lr_frac=0.05)


def default_config() -> ConfigDict:
    """Every field a run reads, with the reference d20 values. Configs override what they choose."""
    c = ConfigDict()
    c.run = ""  # defaults to the config file's name (d20, tiny, ...)
    c.config_args = ""  # set by parse_command: the --config arguments that built this config (for commands in messages)
    c.seed = 0
    # model
    c.depth = 20
    c.aspect_ratio = 64
    c.head_dim = 128
    c.model_dim = 0  # 0: derived from depth; set it (with n_head) only to leave the dial
    c.n_head = 0  # 0: model_dim // head_dim
    c.n_kv_head = 0  # 0: = n_head (MHA); a divisor of n_head gives GQA, 1 gives MQA
    c.vocab_size = 65536
    c.sequence_len = 2048
    c.rope_base = 10000.0
    c.softcap = 15.0
    # the 2026 recipe's model options (configs/d24.py; model.GPTConfig says what each does): October's values here
    c.window_pattern = "L"  # per layer, tiled: "L" the whole context, "S" a quarter of it; "SSSL" in 2026
    c.value_embeds = False
    c.smear = False
    c.backout = False
    c.layer_scalars = False
    c.qk_scale = 1.0  # 1.2
    c.vocab_multiple = 1  # 64
    c.init = "2025"  # "2026"
    c.rope_bf16 = True  # False
    c.fp8 = False  # training matmuls in fp8 (the record's --fp8; Hopper GPUs and later gain, evaluation stays bf16)
    c.compute_dtype = "bfloat16"
    c.attention = "auto"  # auto: cudnn on GPU, xla elsewhere
    # memory (model.py): what each block keeps for the backward ("none"; "dots": the weight matmuls' outputs, so the
    # backward recomputes only attention and elementwise ops, ~+6% FLOPs; "full": only its input, recomputing the whole
    # block, ~+30%), and the cross-entropy's tokens per device per chunk (0: the whole batch's (B, T, vocab) fp32 logits
    # at once, ~1.5 GiB per 2,048-token row of d20 with their gradient). Chosen by the dry run on 8 devices: with
    # "dots" d20 (32 rows), d26 (16) and d32 (8) need 54, 49 and 41 GiB of the 60 a 80 GB card gives; "none" needs 94
    # GiB at d20. 4,096 tokens is where smaller chunks stop lowering the peak.
    c.remat = "dots"
    c.loss_chunk = 4096
    # batch and horizon
    # rows per device per micro-batch; "auto": the largest power of two whose compiled step fits the card, found at
    # start-up by compiling (jaxchat.dryrun.auto_device_batch). A reference that takes an int or "auto" (set_field).
    c.device_batch_size = FieldReference(32, field_type=object)
    c.device_memory_gib = 80.0  # per device; "auto" keeps a step's need under JAX's 75% preallocation of it
    c.total_batch_size = 524288  # tokens per optimizer step; -1: one micro-batch on every device; 0: the 2026 rule
    c.target_param_data_ratio = 20.0
    # the parameters the ratio counts: "all" (October) or "scaling" (2026: the block matrices and the head). With
    # total_batch_size 0 the batch follows the 2026 rule (derive); batch_transfer scales every learning rate by
    # sqrt(total_batch_size / 2**19) and Muon's weight decay by that and the depth-12 model's horizon over this one's.
    c.horizon_params = "all"
    c.batch_transfer = False
    c.num_iterations = -1  # > 0 overrides the derived horizon
    # optimizer
    c.embedding_lr = 0.2  # AdamW's two are tuned at width 768; derive() scales them to the model's
    c.unembedding_lr = 0.004
    c.matrix_lr = 0.02  # Muon's, for the blocks' 2-D weights: not scaled by width
    c.weight_decay = 0.0
    c.adam_beta1 = 0.8  # the reference's betas and eps for the embedding and the head
    c.adam_beta2 = 0.95
    c.adam_eps = 1e-10
    c.grad_clip = 1.0  # clip the global gradient norm to this before the optimizer (0: off); base_train's 1.0
    c.muon_ns_steps = 5
    c.muon_coefficients = "ns5"  # or "polar_express"
    c.muon_ns_dtype = "bfloat16"  # Newton-Schulz precision (float32 for exactness tests)
    c.muon_momentum_start = 0.85  # ramped linearly to muon_momentum_end over muon_momentum_warmup steps
    c.muon_momentum_end = 0.95
    c.muon_momentum_warmup = 300
    # the 2026 optimizer (nanochat-reference.md §2.1-2.5); October's values here
    c.optimizer = "2025"  # "2026": the record's AdamW groups (own betas, eps, weight decay and lr for wte, head, value
    # embeddings, resid and x0 scalars, gates); "2025": embedding and head at adam_beta1/2 and weight_decay
    c.scalar_lr = 0.5  # 2026: x0 scalars at it, resid scalars at 1/100 of it (times the batch scale)
    c.muon_equilibrate = False  # MuonEq: output features equalised before the orthogonalisation
    c.muon_plus = False  # Muon+: the orthogonalised update renormalised to sqrt(min side)
    c.muon_normuon_beta2 = 0.0  # NorMuon's second-moment decay (0.9); 0: off
    c.muon_weight_decay = 0.0  # cautious, cosine-scheduled to 0 (0.28 in 2026, then transferred, see batch_transfer)
    c.muon_momentum_final = 0.0  # > 0: momentum goes linearly to it over the lr warmdown (0.90 in 2026)
    c.warmup_steps = 0  # > 0: an lr warmup of this many steps (40 in 2026) instead of warmup_ratio
    # schedule
    c.warmup_ratio = 0.0
    c.warmdown_ratio = 0.2  # the last 20% of the steps decay linearly to final_lr_frac of the peak
    c.final_lr_frac = 0.0
    # mesh: ("data", "fsdp") with data * fsdp = n_devices; data 0 = one row per process, fsdp 0 = the rest
    c.mesh_data = 0
    c.mesh_fsdp = 0
    # loop
    c.eval_every = 250  # steps between validation bpb measurements (on eval_tokens)
    c.eval_tokens = 20 * 524288
    c.sample_every = 2000
    c.save_every = -1  # steps between checkpoints; <= 0: only at the end and when stopped
    c.log_every = 1
    c.keep_checkpoints = 3
    # steps' batches built on a background thread while the device runs, each loss read after the next step was
    # dispatched; 0: the synchronous loop (batch built and loss read on the loop's thread, one step at a time)
    c.prefetch = 2
    c.peak_flops = 0.0  # 0: look the device up in hardware.PEAK_FLOPS
    c.wandb_project = ""  # set (and pip install wandb) to log there too
    # data
    c.dataset = "fineweb-edu"
    # "stream": October's loader, BOS-joined docs cut into rows, nothing cropped (data/pretrain.py);
    # "bestfit": the 2026 loader, BOS-aligned best-fit rows, ~35% of FineWeb-Edu's tokens cropped at T=2048.
    c.packing = "stream"
    c.allow_repeat = False  # base training refuses a horizon longer than the shards on disk unless this is set
    c.tokenizer = ""  # name under $JAXCHAT_HOME/tokenizer/; defaults to the config file's name (not the run's)
    c.tokenizer_max_chars = 2_000_000_000
    c.tokenizer_doc_cap = 10_000
    # evaluation (evaluate/): which chat tasks, how many problems, how generative tasks sample
    c.eval = ConfigDict()
    c.eval.base_tasks = "CORE"
    c.eval.chat_tasks = "ARC-Easy,ARC-Challenge,MMLU,GSM8K,HumanEval,SpellingBee"
    c.eval.max_problems = -1  # per chat task; -1: all
    c.eval.core_max_per_task = -1  # CORE examples per task; -1: all (the reference's final eval)
    # CORE prompts longer than this many tokens are cropped from the left; 0: scored whole, as the reference scores
    # its own models (it crops only models that declare a max_seq_len: HF GPT-2, 1024)
    c.eval.core_crop = 0
    c.eval.batch_size = 8  # categorical prompts per forward pass
    c.eval.generate_batch = 32  # generative problems decoded together
    c.eval.num_samples = 1  # pass@k samples per generative problem
    c.eval.max_tokens = 512
    c.eval.temperature = 0.0
    c.eval.top_k = 50
    # Chat stages. stage_config lays a group's fields over the top-level fields of the same name for that stage only;
    # its other fields are the stage's own. A group states only where its stage differs from the top level: the
    # learning rates, warmup, final lr fraction, weight decay, mid's warmdown and SFT's sequence length equal base
    # training's in the reference, so they are not repeated, and a top-level override (--config.matrix_lr=0.03)
    # moves every stage's with base training's, as intended. One stage's alone: --config.mid.matrix_lr=0.03
    # (apply_overrides lets a group take any top-level field). num_iterations and save_every stay in every group
    # although d20's values equal the top level's: a stage's -1 means its own epochs and no periodic saves, whatever
    # a config sets for base training (tiny's 300 steps, saving every 100). The values are the reference's
    # (nanochat-reference.md §7).
    c.mid = ConfigDict()
    c.mid.mixture = "reference"  # tasks/mixtures.py
    c.mid.num_iterations = -1  # -1: one epoch of the mixture
    c.mid.init_lr_frac = 1.0
    c.mid.grad_clip = 0.0  # the reference clips in base training only
    c.mid.supervise = "all"  # the reference's mid-training trains on every token, user turns included
    c.mid.eval_every = 150
    c.mid.sample_every = -1
    c.mid.save_every = -1
    c.sft = ConfigDict()
    c.sft.source = "mid"  # or "base": which checkpoint SFT starts from
    c.sft.mixture = "reference"
    c.sft.num_iterations = -1  # -1: num_epochs of the mixture
    c.sft.num_epochs = 1
    c.sft.init_lr_frac = 0.02
    c.sft.warmdown_ratio = 1.0  # linear decay to 0 over the whole run
    c.sft.grad_clip = 0.0
    c.sft.muon_momentum_start = 0.95  # SFT keeps Muon's momentum at 0.95 throughout
    c.sft.device_batch_size = 4
    c.sft.total_batch_size = -1
    c.sft.layout = "padded"  # "padded" (one conversation per row, V0) or "packed" (best-fit whole conversations, HEAD)
    c.sft.target_examples_per_step = 32  # padded: conversations per step, steps = rows // it (0: total_batch_size)
    c.sft.supervise = "assistant"
    c.sft.eval_every = 100
    c.sft.sample_every = -1
    c.sft.save_every = -1
    c.sft.metric_every = 200  # categorical accuracy (MMLU, ARC-Easy) during training
    c.sft.metric_tasks = "MMLU,ARC-Easy"
    c.sft.metric_max_problems = 1024
    c.rl = ConfigDict()
    c.rl.task = "GSM8K"  # trained on its train split, measured on its test split
    c.rl.num_iterations = -1  # -1: num_epochs over the train split, examples_per_step questions per step
    c.rl.num_epochs = 1
    c.rl.examples_per_step = 16  # questions per step, across all processes
    c.rl.num_samples = 16  # samples per question (the group of its advantage baseline)
    c.rl.max_new_tokens = 256
    c.rl.temperature = 1.0
    c.rl.top_k = 50
    c.rl.device_batch_size = 8  # rows per forward in the update
    c.rl.sequence_len = 512  # static row length of the update: prompt + max_new_tokens must fit
    c.rl.init_lr_frac = 0.05
    c.rl.warmdown_ratio = 1.0  # linear decay to 0
    c.rl.grad_clip = 0.0
    c.rl.muon_momentum_start = 0.95
    c.rl.save_every = 60
    c.rl.sample_every = -1
    c.rl.metric_every = 60  # pass@k on the test split
    c.rl.metric_problems = 400
    c.rl.metric_samples = 8
    return c


CHAT_STAGES = ("mid", "sft", "rl")


def stage_config(c: ConfigDict, stage: str) -> ConfigDict:
    """The config a chat stage trains with: its group's fields override the top-level fields of the same name."""
    out = c.copy_and_resolve_references()
    if stage in CHAT_STAGES and stage in c:
        for key, value in c[stage].items():
            if key in out and key not in CHAT_STAGES:
                set_field(out, key, value)
    return out


AUTO = "auto"
AUTO_FIELDS = ("device_batch_size",)  # top-level fields that take "auto" as well as an int


def set_field(c: ConfigDict, key: str, value) -> None:
    """`c[key] = value`, also between "auto" and an int for AUTO_FIELDS: a resolved ConfigDict (every copy) types
    each field by its current value, so switching type means replacing the field."""
    try:
        c[key] = value
    except TypeError:
        if key not in AUTO_FIELDS:
            raise
        del c[key]
        c[key] = value


def with_device_batch(c: ConfigDict, rows: int) -> ConfigDict:
    """A copy of `c` with `device_batch_size` set (e.g. "auto" resolved)."""
    out = c.copy_and_resolve_references()
    set_field(out, "device_batch_size", rows)
    return out


class ConfigError(ValueError):
    """A config that cannot describe a run; the message says which field and why."""


@dataclasses.dataclass(frozen=True)
class Derived:
    """Everything a run computes from its config (and the device count), in one place."""

    model: Any  # model.GPTConfig: shapes, numerics, memory options
    num_params: int  # exact: counted on the model's own (abstract) parameters
    scaling_params: int  # the block matrices and the head (the 2026 horizon's count)
    num_embedding_params: int
    flops_per_token: float
    n_devices: int
    device_batch_size: int
    total_batch_size: int
    grad_accum_steps: int
    num_iterations: int
    embedding_lr: float
    unembedding_lr: float
    matrix_lr: float
    batch_lr_scale: float = 1.0  # sqrt(total_batch_size / 2**19) with batch_transfer, else 1
    muon_weight_decay: float = 0.0  # at step 0 (the schedule takes it to 0)

    @property
    def total_tokens(self) -> int:
        return self.num_iterations * self.total_batch_size


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# The chat stages' named choices (tasks/mixtures.py, data/chat.py, stages.rl_tasks), checked before any work starts.
STAGE_CHOICES = {
    "mid.mixture": ("reference", "tiny"), "sft.mixture": ("reference", "tiny"), "sft.source": ("mid", "base"),
    "sft.layout": ("packed", "padded"), "mid.supervise": ("assistant", "all"), "sft.supervise": ("assistant", "all"),
    "rl.task": ("GSM8K", "Arithmetic"),
}


# The device batch sizes "auto" tries, largest first.
AUTO_BATCHES = (64, 32, 16, 8, 4, 2, 1)


def auto_batch_candidates(c: ConfigDict, n_devices: int) -> list[int]:
    """The sizes `device_batch_size="auto"` may pick, largest first: the powers of two that split total_batch_size
    into whole micro-batches on `n_devices` (all of them when total_batch_size is -1)."""
    if c.total_batch_size == -1:
        return list(AUTO_BATCHES)
    per_row = c.sequence_len * n_devices
    _require(c.total_batch_size > 0 and c.total_batch_size % per_row == 0,
             f"total_batch_size={c.total_batch_size} is not a multiple of sequence_len*n_devices={c.sequence_len}*"
             f"{n_devices}={per_row}, so no device_batch_size (auto or not) splits it into whole micro-batches; "
             "change total_batch_size")
    return [b for b in AUTO_BATCHES if c.total_batch_size % (b * per_row) == 0]


def auto_probe(c: ConfigDict, n_devices: int) -> ConfigDict:
    """`c` with "auto" replaced by its largest candidate: what derive needs to report everything else, compiling
    nothing (python -m jaxchat.config)."""
    return with_device_batch(c, auto_batch_candidates(c, n_devices)[0])


# Per-block rematerialisation (model.REMAT_POLICIES).
REMAT_CHOICES = ("none", "dots", "full")


# Pretraining packings (data/pretrain.py): October's token stream and the 2026 best-fit rows.
PACKINGS = ("stream", "bestfit")


def check_stage_fields(c: ConfigDict) -> None:
    for key, choices in STAGE_CHOICES.items():
        group, field = key.split(".")
        if group in c and field in c[group]:
            value = c[group][field]
            _require(value in choices, f"{key} must be one of {', '.join(choices)}, got {value!r}")
    if "rl" in c:
        _require(c.rl.examples_per_step >= 1 and c.rl.num_samples >= 1,
                 "rl.examples_per_step and rl.num_samples must be >= 1")
        _require(0 < c.rl.max_new_tokens < c.rl.sequence_len,
                 f"rl.max_new_tokens={c.rl.max_new_tokens} must be in [1, rl.sequence_len={c.rl.sequence_len})")


def model_shape(c: ConfigDict) -> tuple[int, int, int, int]:
    """(model_dim, n_head, n_kv_head, head_dim) from the depth dial or explicit overrides."""
    _require(c.depth >= 1, f"depth must be >= 1, got {c.depth}")
    _require(c.head_dim >= 1, f"head_dim must be >= 1, got {c.head_dim}")
    if c.model_dim:
        model_dim = c.model_dim
        n_head = c.n_head or max(1, model_dim // c.head_dim)
    else:
        _require(c.aspect_ratio >= 1, f"aspect_ratio must be >= 1, got {c.aspect_ratio}")
        model_dim = math.ceil(c.depth * c.aspect_ratio / c.head_dim) * c.head_dim
        n_head = c.n_head or model_dim // c.head_dim
    _require(
        model_dim % n_head == 0,
        f"n_head={n_head} does not divide model_dim={model_dim}: pick n_head so model_dim / n_head is an integer",
    )
    head_dim = model_dim // n_head
    _require(head_dim % 2 == 0, f"head dim {head_dim} must be even for rotary embeddings")
    n_kv_head = c.n_kv_head or n_head
    _require(
        1 <= n_kv_head <= n_head and n_head % n_kv_head == 0,
        f"n_kv_head={n_kv_head} must divide n_head={n_head} (MHA: n_head, GQA: a divisor, MQA: 1)",
    )
    return model_dim, n_head, n_kv_head, head_dim


def loss_chunk_positions(c: ConfigDict) -> int:
    """The config's `loss_chunk` (tokens per device per chunk) as positions of every row: the loss sees a device's
    `device_batch_size` rows at once. 0 (unchunked) when the chunk covers whole rows."""
    tokens, rows = c.get("loss_chunk", 0), c.get("device_batch_size", 1)
    if tokens <= 0:
        return 0
    positions = max(1, tokens // (rows if isinstance(rows, int) and rows > 0 else 1))
    return 0 if positions >= c.sequence_len else positions


def model_config(c: ConfigDict, attention: str = "xla"):
    """The model's own config (`model.GPTConfig`): its shapes from the depth dial, its numerics and memory options."""
    from jaxchat.model import GPTConfig  # jax and flax load only where the model is needed

    model_dim, n_head, n_kv_head, _ = model_shape(c)
    return GPTConfig(vocab_size=c.vocab_size, n_layer=c.depth, n_head=n_head, n_kv_head=n_kv_head, n_embd=model_dim,
                     sequence_len=c.sequence_len, rope_base=c.rope_base, softcap=c.softcap,
                     compute_dtype=c.compute_dtype, attention=attention, remat=c.get("remat", "none"),
                     loss_chunk=loss_chunk_positions(c),
                     **{f.name: c.get(f.name, f.default) for f in dataclasses.fields(GPTConfig)
                        if f.name in MODEL_OPTIONS})


# The config fields model.GPTConfig takes as they are (the 2026 recipe's model options).
MODEL_OPTIONS = ("window_pattern", "value_embeds", "smear", "backout", "layer_scalars", "qk_scale", "vocab_multiple",
                 "init", "rope_bf16", "fp8")
B_REF = 2**19  # the batch the 2026 learning rates were tuned at (on a depth-12 model)
REF_DEPTH = 12


def param_counts(m) -> dict[str, int]:
    """{"all", "embedding" (wte), "scaling" (the block matrices and the head: what the 2026 horizon counts),
    "matmul" (every weight a matmul reads: blocks, head, smear gate; FLOPs count these)}, from the model itself."""
    import jax  # here: the dial itself needs no jax

    from jaxchat import model, sharding

    params = model.abstract_params(m)[1]
    flat = [(sharding.path_names(p), math.prod(x.shape), len(x.shape)) for p, x in
            jax.tree_util.tree_leaves_with_path(params)]
    return {"all": sum(n for _, n, _ in flat), "embedding": math.prod(params["wte"].shape),
            "scaling": sum(n for names, n, _ in flat if names[0] in ("blocks", "lm_head")),
            "matmul": sum(n for names, n, ndim in flat if ndim == 2 and names[0] not in ("wte", "value_embeds"))}


def flops_per_token(m, counts: dict[str, int]) -> float:
    """6 FLOPs per matmul weight (forward and backward; the head counts, the embedding lookups do not) plus attention's
    QK^T and AV over each layer's window (the whole sequence for a long layer): October's formula when every layer is
    long, the 2026 reference's with windows."""
    attended = sum(m.window(i) or m.sequence_len for i in range(m.n_layer))
    return float(6 * counts["matmul"] + 12 * m.n_head * m.head_dim * attended)


def derive(c: ConfigDict, n_devices: int = 1) -> Derived:
    model_shape(c)  # its errors first: they name the dial's fields
    _require(c.vocab_size >= 10, f"vocab_size must hold at least the 9 special tokens, got {c.vocab_size}")
    _require(c.sequence_len >= 2, f"sequence_len must be >= 2, got {c.sequence_len}")
    _require(c.device_batch_size != AUTO,
             "device_batch_size='auto' is resolved at start-up by compiling the train step (train.py does it; in code "
             "jaxchat.dryrun.auto_device_batch); this needs a number: set --config.device_batch_size=N")
    _require(isinstance(c.device_batch_size, int) and c.device_batch_size >= 1,
             f"device_batch_size must be an integer >= 1 or 'auto', got {c.device_batch_size!r}")
    _require(c.get("remat", "none") in REMAT_CHOICES,
             f"remat must be one of {', '.join(REMAT_CHOICES)}, got {c.get('remat')!r}")
    _require(c.get("loss_chunk", 0) >= 0, f"loss_chunk must be >= 0 (0: unchunked), got {c.get('loss_chunk')}")
    _require(n_devices >= 1, f"need at least one device, got {n_devices}")
    check_stage_fields(c)
    _require(c.get("packing", "stream") in PACKINGS,
             f"packing must be one of {', '.join(PACKINGS)}, got {c.get('packing')!r}")
    _require(set(c.get("window_pattern", "L").upper()) <= {"S", "L"} and c.get("window_pattern", "L"),
             f"window_pattern takes S and L only (e.g. SSSL), got {c.get('window_pattern')!r}")
    _require(c.get("init", "2025") in ("2025", "2026"), f"init must be 2025 or 2026, got {c.get('init')!r}")
    _require(c.get("horizon_params", "all") in ("all", "scaling"),
             f"horizon_params must be all or scaling, got {c.get('horizon_params')!r}")
    m = model_config(c)
    counts = param_counts(m)
    horizon_params = counts[c.get("horizon_params", "all")]

    tokens_per_micro = c.device_batch_size * c.sequence_len * n_devices
    total = {-1: tokens_per_micro, 0: None}.get(c.total_batch_size, c.total_batch_size)
    if total is None:
        # The 2026 rule (Power Lines, arXiv 2505.13738): 2^19 tokens at depth 12, scaled by (D / D_12)^0.383 with D
        # the horizon's tokens, rounded to a power of two; the ratio cancels, so the batch follows the model's size.
        ref = param_counts(model_config(_with(c, depth=REF_DEPTH)))[c.get("horizon_params", "all")]
        total = 2 ** round(math.log2(B_REF * (horizon_params / ref) ** 0.383))
    _require(
        total > 0 and total % tokens_per_micro == 0,
        f"total_batch_size={total} is not a multiple of device_batch_size*sequence_len*n_devices="
        f"{c.device_batch_size}*{c.sequence_len}*{n_devices}={tokens_per_micro}; change device_batch_size or total_batch_size",
    )
    if c.num_iterations > 0:
        num_iterations = c.num_iterations
    else:
        _require(c.target_param_data_ratio > 0, "set num_iterations > 0 or target_param_data_ratio > 0")
        num_iterations = int(c.target_param_data_ratio * horizon_params) // total
        _require(num_iterations >= 1, f"the derived horizon is {num_iterations} steps; set num_iterations")

    width_scale = (m.n_embd / 768) ** -0.5
    batch_scale = math.sqrt(total / B_REF) if c.get("batch_transfer", False) else 1.0
    muon_weight_decay = c.get("muon_weight_decay", 0.0)
    if muon_weight_decay and c.get("batch_transfer", False):  # the T_epoch rule (arXiv 2405.13698)
        ref = param_counts(model_config(_with(c, depth=REF_DEPTH)))[c.get("horizon_params", "all")]
        muon_weight_decay *= batch_scale * ref / horizon_params
    return Derived(
        model=m,
        num_params=counts["all"],
        num_embedding_params=counts["embedding"],
        scaling_params=counts["scaling"],
        flops_per_token=flops_per_token(m, counts),
        n_devices=n_devices,
        device_batch_size=c.device_batch_size,
        total_batch_size=total,
        grad_accum_steps=total // tokens_per_micro,
        num_iterations=num_iterations,
        embedding_lr=c.embedding_lr * width_scale * batch_scale,
        unembedding_lr=c.unembedding_lr * width_scale * batch_scale,
        matrix_lr=c.matrix_lr * batch_scale,
        batch_lr_scale=batch_scale,
        muon_weight_decay=muon_weight_decay,
    )


def _with(c: ConfigDict, **fields) -> ConfigDict:
    out = c.copy_and_resolve_references()
    for key, value in fields.items():
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Command lines: `--config=configs/d20.py --config.depth=12` (ml_collections' flag syntax), read here for every entry
# point. ml_collections.config_flags reads the same syntax but was left: it keeps the config in absl's process-global
# FLAGS, where a second parse in one process no longer knows the override flags (tests, bench/gpu_check.py and the
# in-process mains build several configs), it refuses `--config.tokenizer_max_chars=2e9` on an int field, and each
# entry point's own options would have to become absl flags.


def load_config_file(path: str) -> ConfigDict:
    import importlib.util
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} not found (try configs/tiny.py or configs/d20.py)")
    spec = importlib.util.spec_from_file_location(f"jaxchat_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a syntax error in a config is the user's to fix; say where
        raise ConfigError(f"could not load config {path}: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} must define get_config() returning an ml_collections.ConfigDict")
    config = module.get_config()
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, expected ConfigDict")
    if not config.get("run"):
        config.run = p.stem
    if "tokenizer" in config and not config.tokenizer:  # the recipe's, shared by every run of it (--config.run=...)
        config.tokenizer = p.stem
    if "config_args" in config:
        config.config_args = shlex.join([f"--config={path}"])
    return config


def boolean(text: str) -> bool:
    """1/true/yes or 0/false/no, for boolean fields and flags (an argparse `type`: ConfigError is a ValueError)."""
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise ConfigError(f"expected a boolean, got {text!r}")


def _parse_value(text: str, current):
    if isinstance(current, bool):
        return boolean(text)
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            value = float(text)  # accept 2e9 and 524_288.0 for integer fields, but not 2.5
            if not value.is_integer():
                raise ConfigError(f"expected an integer, got {text!r}") from None
            return int(value)
    if isinstance(current, float):
        return float(text)
    return text


def apply_overrides(config: ConfigDict, overrides: dict[str, str]) -> ConfigDict:
    """Set dotted fields from strings, converting to the field's existing type; unknown fields are errors. A chat
    stage's group also takes any top-level field it does not list (typed as that field), since stage_config lays
    the group over the top level: `--config.mid.matrix_lr=0.01` changes mid's alone."""
    config = config.copy_and_resolve_references()
    for key, text in overrides.items():
        parts = key.split(".")
        node = config
        for part in parts[:-1]:
            if part not in node:
                raise ConfigError(f"unknown config field {key!r}")
            node = node[part]
        leaf = parts[-1]
        stage_takes = (len(parts) == 2 and parts[0] in CHAT_STAGES and leaf in config
                       and not isinstance(config[leaf], ConfigDict))
        if leaf not in node and not stage_takes:
            close = [k for k in node.keys() if leaf[:4] in k]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config field {key!r}{hint}")
        try:
            if leaf in AUTO_FIELDS and text == AUTO and node is not config:
                raise ConfigError(f"'{AUTO}' is accepted by the top-level {leaf} only; a stage's takes a number")
            if node is config and leaf in AUTO_FIELDS and AUTO in (text, node[leaf]):
                set_field(node, leaf, AUTO if text == AUTO else _parse_value(text, 0))
            elif leaf in node:
                node[leaf] = _parse_value(text, node[leaf])
            else:
                node[leaf] = _parse_value(text, 0 if leaf in AUTO_FIELDS else config[leaf])
        except (ValueError, ConfigError) as e:
            raise ConfigError(f"--config.{key}={text}: {e}") from e
    return config


def _take_overrides(argv) -> tuple[dict[str, str], list[str]]:
    """(the `--config.FIELD` overrides, every other argument in order): argparse cannot declare options whose names
    are the config's fields, so they are taken out before it runs."""
    overrides, rest = {}, []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--config."):
            key, sep, value = arg[len("--config."):].partition("=")
            if not sep:
                value = next(it, None)
                if value is None:
                    raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
            overrides[key] = value
        else:
            rest.append(arg)
    return overrides, rest


def _add_config_arguments(parser: argparse.ArgumentParser, default_config: str | None, required: bool) -> None:
    if any(a.dest == "config" for a in parser._actions):  # already added (a parser used twice)
        return
    group = parser.add_argument_group("config")
    group.add_argument("--config", metavar="PATH", default=default_config, required=required and not default_config,
                       help="the run's config file, configs/<name>.py" +
                       (f" (default {default_config})" if default_config else ""))
    # shown in --help only: _take_overrides has taken every --config.FIELD out before argparse sees the line
    group.add_argument("--config.FIELD", metavar="VALUE", dest="config_overrides", action="append",
                       help="set a field of it (repeatable; --config.FIELD=VALUE too), e.g. --config.depth=12, "
                            "--config.run=exp2, --config.device_batch_size=auto, --config.sft.layout=packed; "
                            "python -m jaxchat.config prints what a config derives")


def parse_command(argv, parser: argparse.ArgumentParser, default_config: str | None = None,
                  required: bool = True) -> tuple[ConfigDict | None, argparse.Namespace]:
    """An entry point's command line -> (config, args), the one way every entry point reads one: `parser` (the entry
    point's own argparse options) gains `--config PATH` and the `--config.FIELD=VALUE` overrides, so --help, usage
    errors (exit status 2) and style are argparse's everywhere; ConfigError when the config file or an override is
    bad. `default_config`: the file used without --config (benches); `required=False`: no --config and no
    overrides give None (jaxchat.inspect, which reads checkpoints without one)."""
    _add_config_arguments(parser, default_config, required)
    overrides, rest = _take_overrides(argv)
    args = parser.parse_args(rest)
    del args.config_overrides
    if args.config is None:
        if overrides:
            raise ConfigError(f"--config.{next(iter(overrides))} needs --config=configs/<name>.py to override")
        return None, args
    config = apply_overrides(load_config_file(args.config), overrides)
    if "config_args" in config:
        config.config_args = shlex.join([f"--config={args.config}",
                                         *(f"--config.{k}={v}" for k, v in overrides.items())])
    return config, args


class _ConfigArguments(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def load_config(args) -> ConfigDict:
    """The config that `--config=PATH [--config.x=y ...]` words build, for code that starts from such words rather
    than a command line (bench/gpu_check.py's stages, runs/speedrun.sh, tests); anything else is a ConfigError."""
    return parse_command(args, _ConfigArguments(prog="load_config", add_help=False))[0]


def command(c: ConfigDict, program: str, *args: str) -> str:
    """A command line for this config, e.g. command(c, "train.py", "--stage=tokenizer") -> `python train.py
    --config=configs/d20.py --config.run=exp2 --stage=tokenizer`: the --config arguments that built `c` (so every
    "run this" message names a command that works), or a placeholder for a config built in code."""
    config_args = c.get("config_args") or f"--config=configs/<name>.py --config.run={shlex.quote(c.get('run', ''))}"
    return " ".join(["python", program, config_args, *args])


@dataclasses.dataclass(frozen=True)
class DataPlan(ShardNeed):
    """What the base horizon needs of the pretraining shards, from the dataset's known figures (data/datasets.py):
    nothing is tokenized. Base training measures the real figures on the shards at start-up (stages.py)."""

    dataset: str
    chars_per_shard: float
    crop_seq_len: int  # the sequence length the crop figure was measured at (0: any)

    @property
    def tokens_per_shard(self) -> float:
        return self.chars_per_shard / self.chars_per_token * (1 - self.crop_fraction)


def data_plan(c: ConfigDict, d: Derived) -> DataPlan | None:
    """The base horizon against the config's dataset, or None when the dataset's figures are unknown."""
    from jaxchat.data.datasets import get_dataset

    ds = get_dataset(c.dataset)
    packing = c.get("packing", "stream")
    if ds.tokens_per_shard(packing) is None:
        return None
    stream = packing == "stream"
    return DataPlan(packing=packing, train_shards=ds.num_shards - 1, chars_per_token=ds.chars_per_token,
                    crop_fraction=0.0 if stream else ds.bestfit_crop, horizon_tokens=d.total_tokens,
                    dataset=c.dataset, chars_per_shard=ds.chars_per_shard,
                    crop_seq_len=0 if stream else ds.bestfit_crop_seq_len)


PACKING_NOTES = {
    "stream": "the October loader: BOS-joined docs cut into consecutive rows, nothing cropped",
    "bestfit": "the 2026 loader: BOS-aligned best-fit rows, the shortest doc cropped when none fits",
}
SFT_LAYOUT_NOTES = {"packed": "best-fit whole conversations, the 2026 reference", "padded": "one conversation per row, "
                    "the October reference"}


def _data_lines(c: ConfigDict, d: Derived) -> list[str]:
    from jaxchat.data.datasets import SHARD_SPARE, download_command

    plan = data_plan(c, d)
    if plan is None:
        return [f"data horizon            {d.total_tokens:,} tokens; the {c.dataset} shards needed are unknown at config "
                "time (no chars/token figure): base training measures them at start-up"]
    crop = f"{plan.crop_fraction:.0%} crop" + (f" (at T={plan.crop_seq_len:,})" if plan.crop_seq_len else "")
    get = download_command(plan.dataset, plan.shards_needed)
    lines = [f"data horizon            {plan.horizon_tokens:,} tokens = {plan.shards_exact:.1f} {plan.dataset} shards of "
             f"{plan.chars_per_shard / 1e6:,.1f}M chars at {plan.chars_per_token} chars/token, {crop}",
             f"  shards needed         {plan.shards_needed} (with {SHARD_SPARE:.0%} spare)"
             + (f": {get}" if get else "")]
    if plan.shards_exact > plan.train_shards:
        lines.append(f"  note                  {plan.dataset} has only {plan.train_shards} train shards: the horizon "
                     + ("repeats data (allow_repeat is set)" if c.get("allow_repeat", False) else
                        "would repeat data, which base training refuses unless allow_repeat is set"))
    return lines


def describe(c: ConfigDict, d: Derived) -> str:
    m = d.model
    lines = [
        f"config {c.run}: depth {m.n_layer}, model_dim {m.n_embd}, heads {m.n_head} (kv {m.n_kv_head}) x {m.head_dim}, "
        f"vocab {m.vocab_size:,}, sequence {m.sequence_len:,}",
        f"parameters              {d.num_params:,}",
        f"  embedding (wte)       {d.num_embedding_params:,}",
        f"  non-embedding         {d.num_params - d.num_embedding_params:,}",
        f"  scaling (blocks+head) {d.scaling_params:,}",
        f"FLOPs per token         {d.flops_per_token:.6e}",
        f"devices                 {d.n_devices}",
        _batch_line(c, d),
        f"memory                  remat {c.get('remat', 'none')}, loss chunk "
        + (f"{c.loss_chunk:,} tokens per device" if c.get("loss_chunk", 0) else "off (whole batch's logits)"),
        f"horizon                 {d.num_iterations:,} steps = {d.total_tokens:,} tokens "
        f"({_tokens_per_param(c, d)}), {d.flops_per_token * d.total_tokens:.3e} FLOPs",
        f"learning rates          embedding {d.embedding_lr:.6g}, unembedding {d.unembedding_lr:.6g}, matrix (Muon) "
        f"{d.matrix_lr:.6g}" + (f"; optimizer {c.optimizer}" if c.get("optimizer", "2025") != "2025" else ""),
        f"schedule                warmup {_warmup_text(c)}, warmdown {c.warmdown_ratio}, final lr frac "
        f"{c.final_lr_frac}; Muon momentum {c.muon_momentum_start} -> {c.muon_momentum_end} over "
        f"{c.muon_momentum_warmup} steps" + (f", -> {c.muon_momentum_final} over the warmdown"
                                             if c.get("muon_momentum_final", 0.0) else "")
        + (f"; Muon weight decay {d.muon_weight_decay:.4g} (cautious, cosine to 0)" if d.muon_weight_decay else ""),
        f"gradient clipping       {_grad_clip_text(c)}",
        f"packing                 {c.get('packing', 'stream')} ({PACKING_NOTES.get(c.get('packing', 'stream'), '?')})"
        + ("; repeats allowed" if c.get("allow_repeat", False) else ""),
        *_data_lines(c, d),
    ]
    if "sft" in c:
        layout = c.sft.get("layout", "packed")
        lines.append(f"SFT layout              {layout} ({SFT_LAYOUT_NOTES.get(layout, '?')})")
    return "\n".join(lines)


def _batch_line(c: ConfigDict, d: Derived) -> str:
    head = "batch                   "
    if c.device_batch_size != AUTO:
        return (f"{head}{d.total_batch_size:,} tokens/step = {d.device_batch_size} rows x {d.model.sequence_len} x "
                f"{d.n_devices} devices x {d.grad_accum_steps} accumulation steps")
    auto = "auto (resolved at start-up by compiling) rows"
    if c.total_batch_size == -1:  # the step's size is the auto batch's: the horizon shown is for the largest candidate
        return (f"{head}one micro-batch per step = {auto} x {d.model.sequence_len} x {d.n_devices} devices (horizon below "
                f"for {d.device_batch_size} rows)")
    return f"{head}{d.total_batch_size:,} tokens/step = {auto} x {d.model.sequence_len} x {d.n_devices} devices x accumulation"


def _tokens_per_param(c: ConfigDict, d: Derived) -> str:
    if c.get("horizon_params", "all") == "scaling":
        return f"{d.total_tokens / d.scaling_params:.1f} tokens per scaling param"
    return f"{d.total_tokens / d.num_params:.1f} tokens/param"


def _warmup_text(c: ConfigDict) -> str:
    return f"{c.warmup_steps} steps" if c.get("warmup_steps", 0) else str(c.warmup_ratio)


def _grad_clip_text(c: ConfigDict) -> str:
    """Base's global-norm clip and the chat stages' where they differ (0: off)."""
    base = c.get("grad_clip", 0.0)
    stages = [f"{s} {c[s].grad_clip}" for s in CHAT_STAGES if s in c and "grad_clip" in c[s]]
    return f"{base} (global norm; 0 = off)" + (f"; {', '.join(stages)}" if stages else "")


def shards_needed(c: ConfigDict, d: Derived) -> int:
    """Train shards the base horizon needs at the dataset's known figures, spare included (`--shards-needed`)."""
    plan = data_plan(c, d)
    if plan is None:
        raise ConfigError(f"the shards needed for dataset {c.dataset!r} are unknown at config time (data/datasets.py "
                          "has no chars/token figure for it); pass the count yourself")
    return plan.shards_needed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m jaxchat.config", description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1, metavar="N", help="devices the batch is split over (default 1)")
    ap.add_argument("--shards-needed", action="store_true",
                    help="print only the train shards the horizon needs, for scripts (runs/speedrun.sh)")
    try:
        config, args = parse_command(argv, ap)
        # nothing is compiled here: with device_batch_size "auto" the rest is derived with the batch left open
        probe = auto_probe(config, args.devices) if config.device_batch_size == AUTO else config
        derived = derive(probe, args.devices)
        text = shards_needed(config, derived) if args.shards_needed else describe(config, derived)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
