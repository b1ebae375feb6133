"""The stages: what data, loss and schedule each one brings to the shared loop (trainer.py).

- tokenizer: BPE on the first `tokenizer_max_chars` characters of the pretraining shards, then the compression table.
- base: pretraining on the shards, stream or best-fit packed (`config.packing`), after checking that they hold the
  horizon; validation bits-per-byte on the pinned val shard.
- mid, sft: the chat mixtures from the previous stage's weights; rl: policy-gradient rollouts from SFT's.

run_stage (`train.py --stage=X`) trains a stage, then evaluates its last checkpoint once; run_all (`--stage=all`)
runs every stage through it in order, then renders the report.
"""
from __future__ import annotations

import math
import sys
import time

import jax
import numpy as np

from jaxchat import config as C
from jaxchat import optim, paths, runlog, tok_eval, trainer
from jaxchat.data import shards, tiny_corpus
from jaxchat.data.datasets import SHARD_SPARE, download_command, get_dataset
from jaxchat.data.pretrain import data_horizon, pretrain_dataset, val_batches
from jaxchat.tokenizer import Tokenizer, config_dir, load_for_config


def prepare_data(config) -> None:
    """The tiny corpus is generated on demand; real datasets must have been downloaded (shards.py says how)."""
    if config.dataset == "tiny":
        tiny_corpus.ensure_tiny_corpus()


def run_tokenizer(config, log=print) -> Tokenizer:
    prepare_data(config)
    train_paths, val_path = shards.list_shards(config.dataset)
    log(f"tokenizer: training {config.vocab_size:,} ids on up to {config.tokenizer_max_chars:,} chars of "
        f"{config.dataset} (docs cropped to {config.tokenizer_doc_cap:,} chars)")
    t0 = time.perf_counter()
    texts = runlog.CharTally(shards.iter_texts(train_paths, max_chars=config.tokenizer_max_chars,
                                               doc_cap=config.tokenizer_doc_cap))
    tok = Tokenizer.train(texts, config.vocab_size, progress=True)
    train_s = time.perf_counter() - t0
    directory = tok.save(config_dir(config))
    log(f"tokenizer: trained in {time.perf_counter() - t0:.1f}s, saved to {directory}")
    samples = {
        f"{config.dataset}-train": "\n".join(shards.read_row_group(train_paths[0], 0)),
        f"{config.dataset}-val": "\n".join(shards.read_row_group(val_path, 0)),
    }
    references, notes = tok_eval.load_reference_encoders()
    rows = tok_eval.compression_table(tok, samples, references)
    log(tok_eval.format_table(rows, notes))
    runlog.write_section(config.run, "tokenizer", "tokenizer", {
        "vocab_size": tok.vocab_size, "dataset": config.dataset, "chars": texts.chars, "docs": texts.docs,
        "train_time_s": train_s, "wall_time_s": time.perf_counter() - t0, "compression": rows, "notes": notes})
    return tok


def check_data_horizon(config, train_paths, tokenizer, derived, log=print) -> dict:
    """The train shards on disk against the base horizon, measured on a sample (pretrain.data_horizon), before any
    training: a horizon that would read them more than once is refused, naming the shards to download, unless
    `allow_repeat` is set. Returns the record the trainer logs in metrics.jsonl."""
    h = data_horizon(train_paths, tokenizer, config.sequence_len, config.packing, derived.total_tokens)
    log(f"base data: {h.train_shards} {config.dataset} train shards, ~{h.tokens_available:,.0f} tokens after "
        f"{h.packing} packing ({h.crop_fraction:.1%} lost to cropping, {h.chars_per_token:.2f} chars/token, measured on "
        f"{h.sample_docs:,} docs); the horizon of {h.horizon_tokens:,} tokens is {h.epochs:.2f} epochs")
    if h.epochs > 1:
        ds = get_dataset(config.dataset)
        get = download_command(config.dataset, h.shards_needed)
        if get is None:
            where = f"{config.dataset} is generated locally, not downloaded, so lower num_iterations"
        elif h.shards_needed >= ds.num_shards:
            where = f"{config.dataset} has only {ds.num_shards - 1} train shards in all, so lower num_iterations"
        else:
            where = f"run `{get}`"
        reason = (f"the base horizon of {h.horizon_tokens:,} tokens is {h.epochs:.2f} epochs of the {h.train_shards} "
                  f"{config.dataset} train shards on disk (~{h.tokens_per_shard:,.0f} tokens per shard after "
                  f"{h.packing} packing, {h.crop_fraction:.1%} lost to cropping)")
        if not config.allow_repeat:
            raise C.ConfigError(
                f"{reason}: training would repeat data. It needs {h.shards_needed} train shards ({SHARD_SPARE:.0%} "
                f"spare included): {where}; or set --config.allow_repeat=True to train on repeated data")
        log(f"base data: {reason}; allow_repeat is set, so the data repeats")
    return {"data_horizon": h.record()}


def base_stage(config, tokenizer, log=print) -> trainer.Stage:
    prepare_data(config)
    train_paths, val_path = shards.list_shards(config.dataset)
    derived = C.derive(config, len(jax.devices()))
    record = check_data_horizon(config, train_paths, tokenizer, derived, log)

    def train_data(rows, pidx, pcount):
        return iter(pretrain_dataset(train_paths, tokenizer, rows, config.sequence_len, pidx, pcount,
                                     packing=config.packing))

    def val_data(rows, pidx, pcount):
        return val_batches(val_path, tokenizer, rows, config.sequence_len, pidx, pcount, packing=config.packing)

    return trainer.Stage(
        name="base",
        num_iterations=derived.num_iterations,
        train_data=train_data,
        val_data=val_data,
        schedule=lambda step: optim.schedule(config, derived, step),
        start_record=record,
    )


# ---- chat stages: mid-training and SFT -------------------------------------------------------------------------------

CHAT_SAMPLE_PROMPTS = (
    "Hello! Who are you?",
    "What is the capital of France?",
    "Tom has 12 apples and gets 7 more. How many apples does Tom have now?",
)


def start_from(config, source: str):
    """A Stage's init_params: the newest `source` checkpoint, FSDP-sharded over the stage's mesh."""
    def init(mesh):
        from jaxchat.checkpoint import load_params

        params, step = load_params(config, source, mesh=mesh)
        print(f"starting from {source} step {step:,} ({paths.run_dir(config.run, source)})", flush=True)
        return params
    return init


def packed_rows_per_conversation(lengths: list[int], capacity: int, buffer_size: int = 100) -> float:
    """Rows per conversation under data/chat.py's best-fit packing, simulated on a sample of rendered lengths."""
    lengths = [min(n, capacity) for n in lengths]
    buffer, rows, i = [], 0, 0
    while i < len(lengths) or buffer:
        rows += 1
        space = capacity
        while True:
            while len(buffer) < buffer_size and i < len(lengths):
                buffer.append(lengths[i])
                i += 1
            fits = [n for n in buffer if n <= space]
            if not fits:
                break
            best = max(fits)
            buffer.remove(best)
            space -= best
    return rows / max(1, len(lengths))


def epoch_steps(tasks, tokenizer, seq_len: int, rows_per_step: int, layout: str, sample: int = 2000,
                seed: int = 0) -> int:
    """Optimizer steps in one epoch of a mixture. Padded rows (one conversation each): `len // rows_per_step`, as
    the reference's V0 SFT (`len(train_ds) // target_examples_per_step`; the remainder is not trained on). Packed
    rows: estimated by packing a seeded sample of rendered conversations, rounded up."""
    n = sum(len(t) for t in tasks)
    if layout == "padded":
        return max(1, n // rows_per_step)
    pairs = [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]
    pick = np.random.default_rng(seed).permutation(len(pairs))[:sample]
    lengths = [len(tokenizer.render_conversation(tasks[pairs[j][0]][pairs[j][1]], max_tokens=seq_len + 1)[0])
               for j in pick]
    rows = n * packed_rows_per_conversation(lengths, seq_len + 1)
    return max(1, math.ceil(rows / rows_per_step))


def chat_horizon(config, name: str, train_tasks, tokenizer, n_devices: int):
    """(stage config with its batch and horizon set, Derived) for a chat stage. Padded rows with
    `target_examples_per_step` > 0 are the reference's V0 SFT: a step is that many conversations (one per row of
    sequence_len) over device_batch_size x devices x gradient accumulation (32 = 4 x 8 x 1 on 8 GPUs), and the
    horizon is `rows // target_examples_per_step * num_epochs` (22,443 rows -> 701 steps)."""
    sc = C.stage_config(config, name)
    group = config[name]
    layout = group.get("layout", "packed")
    if layout == "padded" and group.get("target_examples_per_step", 0) > 0:
        sc.total_batch_size = group.target_examples_per_step * sc.sequence_len
    probe = C.derive(sc, n_devices)
    rows_per_step = probe.total_batch_size // sc.sequence_len
    if group.num_iterations > 0:
        sc.num_iterations = group.num_iterations
    else:
        epoch = epoch_steps(train_tasks, tokenizer, sc.sequence_len, rows_per_step, layout)
        sc.num_iterations = epoch * group.get("num_epochs", 1)
    return sc, C.derive(sc, n_devices)


def chat_stage(config, name: str, tokenizer, source: str) -> tuple[trainer.Stage, object]:
    """Mid-training or SFT: the stage's mixture through the shared loop, starting from `source`'s weights.
    Returns the Stage and the stage config the loop must run with (stage_config)."""
    from jaxchat.data.chat import chat_dataset
    from jaxchat.tasks.mixtures import mixture

    group = config[name]
    train_tasks = mixture(name, group.mixture, "train")
    val_tasks = mixture(name, group.mixture, "val")
    layout = group.get("layout", "packed")
    sc, derived = chat_horizon(config, name, train_tasks, tokenizer, len(jax.devices()))
    n_steps = sc.num_iterations

    def train_data(rows, pidx, pcount):
        return iter(chat_dataset(train_tasks, tokenizer, rows, sc.sequence_len, mode=layout, seed=sc.seed,
                                 process_index=pidx, process_count=pcount, supervise=group.supervise))

    def val_data(rows, pidx, pcount):
        return chat_dataset(val_tasks, tokenizer, rows, sc.sequence_len, mode=layout, seed=0, num_epochs=1,
                            process_index=pidx, process_count=pcount, supervise=group.supervise)

    def schedule(step):
        hp = optim.schedule(sc, derived, step)
        return {**hp, "lrm": hp["lrm"] * group.init_lr_frac}

    prompts = tuple(tokenizer.render_for_completion({"messages": [{"role": "user", "content": p}]})
                    for p in CHAT_SAMPLE_PROMPTS)
    stage = trainer.Stage(
        name=name, num_iterations=n_steps, train_data=train_data, val_data=val_data, schedule=schedule,
        init_params=start_from(config, source), sample_prompts=prompts,
        metrics=_metric_fn(config, sc, tokenizer) if name == "sft" else None,
        metrics_every=group.get("metric_every", -1),
    )
    return stage, sc


def _metric_fn(config, sc, tokenizer):
    """SFT's periodic categorical accuracy (the reference tracks MMLU and ARC-Easy); tasks without data are dropped."""
    from jaxchat.data.fetch import FetchError
    from jaxchat.data.hub import HubDatasetUnavailable
    from jaxchat.engine import Engine
    from jaxchat.evaluate.chat_eval import categorical_eval
    from jaxchat.tasks import eval_task

    tasks = {}
    for name in [t.strip() for t in sc.sft.metric_tasks.split(",") if t.strip()]:
        try:
            task = eval_task(name)
            len(task)  # loads (or downloads) the data now
        except (HubDatasetUnavailable, FetchError, FileNotFoundError) as e:  # costs only this metric, reason shown
            print(f"sft: skipping the {name} metric: {str(e).splitlines()[0]}", flush=True)
            continue
        tasks[name] = task
    if not tasks:
        return None
    gcfg = C.model_config(sc)
    pidx, pcount = jax.process_index(), jax.process_count()

    def metrics(params) -> dict:
        last_logits = Engine(gcfg, params, tokenizer).last_logits
        return {f"{name}_acc": categorical_eval(last_logits, tokenizer, task, seq_len=sc.sequence_len,
                                                batch_size=sc.eval.batch_size, max_problems=sc.sft.metric_max_problems,
                                                pidx=pidx, pcount=pcount).accuracy
                for name, task in tasks.items()}

    return metrics


# ---- RL -------------------------------------------------------------------------------------------------------------


def rl_tasks(name: str):
    """(train task, test task) for RL by name: GSM8K (the reference) or the offline Arithmetic stand-in."""
    if name == "GSM8K":
        from jaxchat.tasks.gsm8k import GSM8K
        return GSM8K("main", "train"), GSM8K("main", "test")
    if name == "Arithmetic":
        from jaxchat.tasks.synthetic import Arithmetic
        return Arithmetic(size=7473, split="train"), Arithmetic(size=1319, split="test")
    raise ValueError(f"rl.task must be GSM8K or Arithmetic, got {name!r}")


def rl_stage(config, tokenizer, train_task=None, test_task=None) -> tuple[trainer.Stage, object]:
    """RL from the latest SFT checkpoint: rollouts (rl.Rollouts) as the data, the policy gradient (rl.pg_loss) as the
    loss, linear decay from init_lr_frac as the schedule. Returns the Stage and its stage config."""
    from jaxchat import rl
    from jaxchat.evaluate.chat_eval import generative_eval

    if jax.process_count() > 1:
        raise NotImplementedError("the RL stage runs in one process (its rollouts sample from process-local inputs); "
                                  "run it on one host, which may have many devices")
    group = config.rl
    if train_task is None:
        train_task, test_task = rl_tasks(group.task)
    sc = C.stage_config(config, "rl")
    rows_per_step = group.examples_per_step * group.num_samples
    sc.total_batch_size = rows_per_step * sc.sequence_len
    n_steps = group.num_iterations if group.num_iterations > 0 else max(
        1, len(train_task) // group.examples_per_step * group.num_epochs)
    sc.num_iterations = n_steps
    n_devices = len(jax.devices())
    derived = C.derive(sc, n_devices)
    gcfg = derived.model

    def train_data(rows, slot, n_slots):
        return rl.Rollouts(train_task, tokenizer, gcfg, rows=rows, slot=slot, n_slots=n_slots,
                           examples_per_step=group.examples_per_step, num_samples=group.num_samples,
                           max_new_tokens=group.max_new_tokens, temperature=group.temperature, top_k=group.top_k,
                           seq_len=sc.sequence_len)

    def schedule(step):
        hp = optim.schedule(sc, derived, step)
        return {**hp, "lrm": hp["lrm"] * group.init_lr_frac}

    def metrics(params) -> dict:
        from jaxchat.engine import Engine

        r = generative_eval(Engine(gcfg, params, tokenizer), tokenizer, test_task, num_samples=group.metric_samples,
                            max_tokens=group.max_new_tokens, temperature=group.temperature, top_k=group.top_k,
                            problems_per_batch=max(1, 64 // group.metric_samples),
                            max_problems=group.metric_problems)
        return {f"pass@{k + 1}": c / max(1, r.total) for k, c in enumerate(r.pass_at)}

    stage = trainer.Stage(name="rl", num_iterations=n_steps, train_data=train_data, val_data=None, schedule=schedule,
                          loss_fn=rl.pg_loss, init_params=start_from(config, "sft"),
                          sample_prompts=(), metrics=metrics if test_task is not None else None,
                          metrics_every=group.metric_every, row_keys=("advantages",))
    return stage, sc


# ---- orchestration: the one place a stage's training is followed by its evaluation ----------------------------------

STAGES = ("tokenizer", "base", "mid", "sft", "rl")


def evaluate_if_new(config, stage: str, step: int, log=print) -> None:
    """The stage's evaluation at the end of training, once per checkpoint step (re-running `all` does not repeat it)."""
    import json

    from jaxchat.evaluate.run import default_tasks, evaluate_stage

    if not default_tasks(config, stage):
        return
    done = paths.run_dir(config.run, stage) / "eval.json"
    try:
        if json.loads(done.read_text()).get("step") == step:
            log(f"{stage}: evaluation of step {step:,} already in {done}")
            return
    except (OSError, ValueError):
        pass
    evaluate_stage(config, stage, log=log)


def train_stage(config, stage: str, tokenizer, log=print) -> trainer.Result:
    """Train one model stage, resuming from its latest checkpoint (nothing is left to train when that is its last)."""
    if stage == "base":
        return trainer.run(config, base_stage(config, tokenizer, log), tokenizer, log=log)
    if stage in ("mid", "sft"):
        spec, sc = chat_stage(config, stage, tokenizer, config.sft.source if stage == "sft" else "base")
    elif stage == "rl":
        spec, sc = rl_stage(config, tokenizer)
    else:
        raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(STAGES + ('all',))}")
    return trainer.run(sc, spec, tokenizer, log=log)


def run_stage(config, stage: str, log=print):
    """`train.py --stage=<stage>`: train it, then evaluate its final checkpoint unless that step's evaluation is
    already recorded. runs/speedrun.sh calls this once per stage and runs no evaluation of its own."""
    if stage == "tokenizer":
        return run_tokenizer(config, log)
    result = train_stage(config, stage, load_for_config(config), log)
    if result.completed:
        evaluate_if_new(config, stage, result.step, log)
    return result


def run_all(config, log=print):
    """Every stage through run_stage, in order, then the report; each resumes (or is skipped when complete, its
    evaluation too), so re-running continues where it stopped."""
    from jaxchat.evaluate import report

    if not (config_dir(config) / "tokenizer.json").exists():
        run_tokenizer(config, log)
    else:
        log(f"tokenizer: using {config_dir(config)}")
    result = None
    for stage in STAGES[1:]:
        result = run_stage(config, stage, log)
        if not result.completed:
            log(f"stopped during {stage}; re-run the same command to continue")
            sys.exit(0)
    log(f"report: {report.render(config.run)}")
    return result
