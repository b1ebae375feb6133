"""The one training loop every stage shares: base, mid, SFT (and RL's update) differ only in their `Stage`.

A `Stage` supplies data (a grain iterator with exact `get_state`/`set_state`), an optional validation pass, a loss and
a schedule. The loop supplies everything else, once:

- a jitted step with gradient accumulation and donated buffers (train_step.py), hyperparameters as traced scalars;
- a host that never makes the device wait: the next `config.prefetch` steps' batches are drawn, stacked and placed on
  the devices by a background thread while the current step runs, and a step's loss is read only after the next step
  was dispatched (nanodo's order), so the host waits on step N while step N+1 is already queued. Each prefetched
  batch carries the data streams' state right after it, and a checkpoint saves that of the last batch a step
  consumed. `prefetch=0` is the synchronous loop, one step at a time (RL's on-policy data always runs that way);
- resume: the latest valid checkpoint (params, optimizer, data-iterator state, step, RNG) is restored onto the current
  mesh, so re-running the same command continues exactly where the last one stopped;
- periodic validation bits-per-byte, greedy samples of fixed prompts, checkpoints;
- SIGTERM/SIGINT: finish the step in flight, save, exit cleanly (a second Ctrl-C aborts at once); several processes
  agree on stopping every `SYNC_EVERY` steps and at every eval/save, so they all stop, and save, at the same step;
- a console progress line (step, loss, lr, tokens/s, MFU, elapsed, ETA) and one JSON line per logged step in
  `runs/<run>/<stage>/metrics.jsonl`; wandb when installed and `config.wandb_project` is set.
"""
from __future__ import annotations

import dataclasses
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable

import jax
import numpy as np

from jaxchat import config as C
from jaxchat import hardware, model, optim, paths, runlog, sharding, train_step
from jaxchat.checkpoint import Checkpointer
from jaxchat.evaluate.bpb import make_evaluator

# The reference's fixed prompts (base_train.py): a visible, if anecdotal, measure of what the model knows.
SAMPLE_PROMPTS = (
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
)

# The host waits for a finished step at least this often, even when it logs less often: emulated CPU devices on jax
# 0.10/0.11 can stall in XLA's in-process all-reduce after ~50-100 steps dispatched without a sync (environment.md).
# Processes of a multi-host run agree on stopping at these steps (and at every eval, sample and save): the agreement
# is a collective that waits for the step just dispatched, so it is not paid every step.
SYNC_EVERY = 10


@dataclasses.dataclass
class Stage:
    """What a stage brings to the shared loop."""

    name: str
    num_iterations: int
    # (rows, reader slot, slot count; a slot per process and mesh data row, sharding.batch_readers) -> iterator of
    # {"inputs","targets"} (rows, T) int32 numpy batches with get_state()/set_state()
    train_data: Callable[[int, int, int], object]
    # same arguments -> a fresh iterable of validation batches (None: no validation)
    val_data: Callable[[int, int, int], Iterable[dict]] | None
    schedule: Callable[[int], dict]
    loss_fn: Callable = model.loss_fn
    # mesh -> initial params on sharding.param_shardings(., mesh), e.g. the previous stage's weights; None: fresh init
    init_params: Callable[[object], object] | None = None
    # text prompts (BOS is prepended) or token lists (e.g. a conversation rendered for completion)
    sample_prompts: tuple[str | list[int], ...] = SAMPLE_PROMPTS
    # params -> {name: value}: extra measurements logged every `metrics_every` steps (e.g. SFT's MMLU accuracy)
    metrics: Callable[[object], dict] | None = None
    metrics_every: int = -1
    # extra per-row batch arrays the loss takes after inputs and targets (RL's advantages)
    row_keys: tuple[str, ...] = ()
    # written to metrics.jsonl at the step the loop starts from (e.g. base's data horizon check)
    start_record: dict | None = None


@dataclasses.dataclass
class Result:
    stage: str
    step: int
    completed: bool  # False when stopped by a signal before the last step
    val_bpb: float | None
    params: object = None


def resolve_attention(config) -> str:
    impl, why = model.resolve_attention(config.attention, jax.devices()[0].platform)
    if impl != config.attention:
        print(f"attention: {impl} ({why})", flush=True)
    return impl


def resolve_fp8(gcfg: model.GPTConfig) -> model.GPTConfig:
    """`fp8` where the device has FP8 GEMMs (compute capability 8.9 and later: Ada, Hopper, Blackwell), else bf16,
    saying why: elsewhere fp8 would only add its rounding."""
    if not gcfg.fp8:
        return gcfg
    ok, why = model.fp8_supported(jax.devices()[0])
    if not ok:
        print(f"fp8: off ({why})", flush=True)
        return dataclasses.replace(gcfg, fp8=False)
    return gcfg


class _StopFlag:
    """SIGTERM/SIGINT ask the loop to stop after the current step; a second SIGINT aborts.

    The handler only sets `heard`, which stays set: the loop reads it once per step (one process) or at the steps
    where all processes agree (several), so a signal landing anywhere, mid-agreement included, is never lost."""

    def __init__(self):
        self.heard = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread): no handlers
                pass
        return self

    def _handle(self, signum, frame):
        if self.heard and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.heard = True
        print(f"\nreceived {signal.Signals(signum).name}: finishing this step, saving a checkpoint, then exiting "
              "(Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Readers:
    """This process's rows of the global batch: one stream per reader slot it owns (sharding.batch_readers),
    concatenated in slot order. A checkpoint keeps every slot's state, gathered from all processes, so each
    process resumes its own streams exactly."""

    def __init__(self, make: Callable, rows_per_slot: int, slots: list[int], n_slots: int):
        self.slots, self.n_slots = slots, n_slots
        self._its = [iter(make(rows_per_slot, s, n_slots)) for s in slots]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batches = [next(it) for it in self._its]
        return batches[0] if len(batches) == 1 else {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    @property
    def on_policy(self) -> bool:
        """Streams that sample from the current weights (RL's rollouts): their next batch needs the last step's params,
        so it cannot be built ahead."""
        return any(hasattr(it, "bind") for it in self._its)

    def bind(self, params) -> None:
        for it in self._its:
            if hasattr(it, "bind"):
                it.bind(params)

    def epoch(self) -> int | None:
        """The furthest epoch this process's streams are reading, where they say (pipelines with an `epoch`)."""
        epochs = [it.epoch for it in self._its if isinstance(getattr(it, "epoch", None), int)]
        return max(epochs) if epochs else None

    def step_metrics(self) -> dict:
        """Means over this process's streams of what on-policy streams report about their last step."""
        found = [it.step_metrics() for it in self._its if hasattr(it, "step_metrics")]
        return {k: float(np.mean([f[k] for f in found])) for k in found[0]} if found else {}

    def snapshot(self) -> DataSnapshot:
        """This process's streams as they stand now, between two steps' batches. Whoever draws a step's batch takes
        one right after it (the prefetch thread, steps ahead of the device), and the loop keeps the one of the last
        batch a step consumed: that, not the streams' current position, is what a checkpoint must hold."""
        return DataSnapshot({s: it.get_state() for s, it in zip(self.slots, self._its)}, self.epoch(),
                            self.step_metrics())

    def global_state(self, snapshot: DataSnapshot) -> dict:
        """Every slot's state in `snapshot`, in slot order (a collective: every process must call it at the same
        step)."""
        merged = {int(s): st for part in sharding.allgather_json(snapshot.states) for s, st in part.items()}
        return {"slots": [merged[s] for s in range(self.n_slots)]}

    def set_state(self, state: dict) -> None:
        saved = state["slots"] if "slots" in state else [state]  # saved before reader slots existed: one stream
        if len(saved) != self.n_slots:
            raise ValueError(f"the checkpoint's data state has {len(saved)} reader slot(s) but this launch has "
                             f"{self.n_slots} (processes x data rows of the mesh): exact resume needs the same "
                             "process count and mesh_data as the run that saved it")
        for s, it in zip(self.slots, self._its):
            it.set_state(saved[s])


@dataclasses.dataclass(frozen=True)
class DataSnapshot:
    """The data streams right after one step's batch was drawn (Readers.snapshot)."""

    states: dict  # reader slot -> its iterator's get_state()
    epoch: int | None
    step_metrics: dict  # what on-policy streams report about the rollouts of this batch


def step_batches(data: Readers, grad_accum: int, keys: tuple[str, ...], stack_sharding) -> Callable[[], tuple]:
    """A function that draws one optimizer step's batch from `data`: `grad_accum` micro-batches stacked to (A, B, T)
    numpy arrays ((A, B) for per-row keys), placed on the devices in the step's sharding, and the streams' snapshot
    right after them. Callable from any one thread (the prefetcher's)."""
    row_sharding = jax.sharding.NamedSharding(stack_sharding.mesh, jax.sharding.PartitionSpec(*stack_sharding.spec[:2]))

    def build():
        micro = [next(data) for _ in range(grad_accum)]
        snapshot = data.snapshot()
        stacked = {k: np.stack([m[k] for m in micro]) for k in keys}
        placed = {k: jax.make_array_from_process_local_data(stack_sharding if v.ndim == 3 else row_sharding, v)
                  for k, v in stacked.items()}
        return placed, snapshot

    return build


class Prefetcher:
    """Calls `produce` `count` times on a background thread, keeping up to `depth` results queued ahead of `next()`.

    The bounded queue holds whole steps' batches already placed on the devices, so the host work of step N+1 (reading,
    tokenizing, packing, the host-to-device copy) runs while the device computes step N. An exception in `produce`
    (StopIteration included) is raised by the `next()` that would have returned its result, on the consumer's thread
    and with its original traceback. `close()` (or leaving the `with` block) stops the thread after the item in
    progress and drops what is queued; the daemon thread never keeps the process alive.
    """

    def __init__(self, produce: Callable[[], object], count: int, depth: int):
        if depth < 1:
            raise ValueError(f"prefetch depth must be >= 1, got {depth}")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(produce, count), name="jaxchat-prefetch", daemon=True)
        self._thread.start()

    def _work(self, produce, count: int) -> None:
        try:
            for _ in range(count):
                if self._closed.is_set() or not self._put((produce(), None)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, who raises it
            self._put((None, e))

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            try:
                item, error = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the prefetch thread has ended: more batches were asked for than it was told "
                                       "to produce, or it was closed") from None
        if error is not None:
            error.add_note("(raised in jaxchat's data prefetch thread, trainer.Prefetcher)")
            raise error
        return item

    def queued(self) -> int:
        """Results produced and not yet taken."""
        return self._queue.qsize()

    def close(self, timeout: float = 10.0) -> None:
        self._closed.set()
        self._drain()  # a producer blocked on a full queue sees `closed` within 0.1 s
        self._thread.join(timeout)
        self._drain()  # release the queued device buffers now

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def make_sampler(cfg: model.GPTConfig, tokenizer, prompts: Iterable[str], max_new_tokens: int, mesh=None):
    """Greedy completions of fixed prompts (text after <|bos|>) by the engine, with the weights of the moment."""
    from jaxchat.engine import Engine

    encoded = [tokenizer.encode(p, prepend=tokenizer.bos_id) if isinstance(p, str) else list(p) for p in prompts]
    encoded = [e[:cfg.sequence_len - 1] for e in encoded]
    budgets = [min(max_new_tokens, cfg.sequence_len - len(e)) for e in encoded]

    def sample(params) -> list[str]:
        rows, _ = Engine(cfg, params, tokenizer, mesh=mesh).generate_batch(encoded, max_tokens=budgets, temperature=0.0)
        return [tokenizer.decode(row[1:]) for row in rows]

    return sample


def run(config, stage: Stage, tokenizer, *, log: Callable[[str], None] = print) -> Result:
    """Train `stage` to `stage.num_iterations`, resuming from its latest checkpoint if there is one."""
    devices = jax.devices()
    derived = C.derive(config, len(devices))
    mesh = sharding.make_mesh(config.mesh_data, config.mesh_fsdp)
    gcfg = resolve_fp8(C.model_config(config, attention=resolve_attention(config)))
    graphdef, abstract = model.abstract_params(gcfg)
    tx = optim.make_optimizer(config, derived)
    p_shard = sharding.param_shardings(abstract, mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract)
    o_shard = sharding.state_shardings(tx, abstract, mesh)
    step_fn = train_step.jit_train_step(graphdef, tx, param_shardings=p_shard, state_shardings=o_shard,
                                        batch_sharding=sharding.batch_sharding(mesh), loss_fn=stage.loss_fn,
                                        row_keys=stage.row_keys)
    micro_sharding = sharding.batch_sharding(mesh, accumulation_axis=False)
    stack_sharding = sharding.batch_sharding(mesh)

    stage_dir = paths.run_dir(config.run, stage.name)
    ckpt = Checkpointer(stage_dir / "checkpoints", keep=config.keep_checkpoints)
    rows = config.device_batch_size * jax.local_device_count()
    pidx, pcount = jax.process_index(), jax.process_count()
    slots, n_slots, slot_devices = sharding.batch_readers(mesh)
    data = Readers(stage.train_data, config.device_batch_size * slot_devices, slots, n_slots)

    start = 0
    rng = jax.random.key(config.seed)
    if ckpt.latest_step() is not None:
        restored = ckpt.restore(abstract_params=_with_shardings(abstract, p_shard),
                                abstract_opt_state=_with_shardings(abstract_opt, o_shard))
        params, opt_state, start, rng = restored.params, restored.opt_state, restored.step, restored.rng
        data.set_state(restored.data_state)
        log(f"resumed {stage.name} from step {start:,} ({stage_dir / 'checkpoints'})")
    elif stage.init_params is not None:
        params = stage.init_params(mesh)
        opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
    else:
        params, opt_state = train_step.init_state(gcfg, config.seed, tx, param_shardings=p_shard,
                                                  state_shardings=o_shard)

    n_steps = stage.num_iterations
    tokens_per_step = derived.total_batch_size
    # validation bpb in bf16 even when training in fp8, as the reference evaluates
    eval_graphdef = model.graphdef(dataclasses.replace(gcfg, fp8=False))
    evaluator = make_evaluator(eval_graphdef, tokenizer.token_bytes, mesh) if stage.val_data else None
    val_steps = max(1, config.eval_tokens // (rows * pcount * config.sequence_len))
    sampler = (make_sampler(gcfg, tokenizer, stage.sample_prompts, 16, mesh)
               if stage.sample_prompts and config.sample_every > 0 else None)
    metrics = runlog.MetricsLog(stage_dir / runlog.METRICS_FILE, start, primary=pidx == 0)
    if stage.start_record:
        metrics.write({"step": start, **stage.start_record})
    wandb_run = _maybe_wandb(config, stage.name)
    device_kind = devices[0].device_kind

    def place(batch, target):
        return {k: jax.make_array_from_process_local_data(target, np.asarray(v)) for k, v in batch.items()}

    def validate(params) -> float:
        val = Readers(stage.val_data, config.device_batch_size * slot_devices, slots, n_slots)
        batches = (b for _, b in zip(range(val_steps), val))
        return evaluator(params, batches, place=lambda b: place(b, micro_sharding))

    build = step_batches(data, derived.grad_accum_steps, ("inputs", "targets", *stage.row_keys), stack_sharding)
    # prefetch 0 is the synchronous loop: each batch built on this thread, each step read before the next. On-policy
    # data (RL) samples from the weights of the step before, so it is always built that way.
    depth = 0 if data.on_policy else max(0, config.get("prefetch", 2))
    consumed = data.snapshot()  # the streams after the last batch a step consumed (what a checkpoint saves)

    def save(step, extra):
        ckpt.save(step, params=params, opt_state=opt_state, rng=rng, data_state=data.global_state(consumed),
                  config=config.to_dict(), metrics=extra)

    val_bpb = None
    if start == 0 and evaluator:
        val_bpb = validate(params)
        metrics.write({"step": 0, "val_bpb": val_bpb})
        log(f"step {0:>6}/{n_steps} | val bpb {val_bpb:.4f}")
    log(f"{stage.name}: {n_steps:,} steps of {tokens_per_step:,} tokens, {derived.grad_accum_steps} micro-batches each, "
        f"{len(devices)} device(s) ({device_kind}), mesh {dict(mesh.shape)}")

    t_start = time.perf_counter()
    t_last, last_logged, smooth = t_start, start, None

    def measure(done: int, hparams: dict, out: dict, snapshot: DataSnapshot) -> dict:
        """Step `done`'s log record and console line. float() waits for that step (and only that step) to finish."""
        nonlocal t_last, last_logged, smooth
        loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
        now = time.perf_counter()
        dt = (now - t_last) / (done - last_logged)
        t_last, last_logged = now, done
        smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
        tps = tokens_per_step / dt
        mfu = hardware.mfu(derived.flops_per_token, tps, device_kind, len(devices), config.peak_flops)
        elapsed = now - t_start
        eta = elapsed / (done - start) * (n_steps - done)
        record = {"step": done, "loss": loss, "lr": hparams["lrm"] * derived.matrix_lr, "lrm": hparams["lrm"],
                  "momentum": hparams.get("momentum"), "tokens_per_s": tps, "mfu": mfu, "elapsed": elapsed,
                  "grad_norm": grad_norm}
        if snapshot.epoch is not None:
            record["epoch"] = snapshot.epoch
        record.update(snapshot.step_metrics)  # e.g. RL's mean reward of this step's rollouts
        log(f"step {done:>6}/{n_steps} | loss {smooth:.4f} | lrm {hparams['lrm']:.3f} | "
            + "".join(f"{k} {v:.3f} | " for k, v in snapshot.step_metrics.items())
            + f"{dt * 1e3:.0f} ms | {tps:,.0f} tok/s | MFU {'n/a' if mfu is None else f'{mfu:.1f}%'} | "
            f"{_format_duration(elapsed)} elapsed | ETA {_format_duration(eta)}")
        return record

    def write(record: dict, done: int) -> None:
        metrics.write(record)
        if wandb_run:
            wandb_run.log({k: v for k, v in record.items() if v is not None}, step=done)

    def settle(pending: tuple) -> None:
        """A step that paused for nothing, read one step late (at once with prefetch 0): logged if due, else waited
        for every SYNC_EVERY steps."""
        done, hparams, out, snapshot = pending
        if done % config.log_every == 0:
            write(measure(done, hparams, out, snapshot), done)
        elif done % SYNC_EVERY == 0:
            jax.block_until_ready(out)

    completed = start
    pending = None  # (step, hparams, metrics, snapshot) of the last step dispatched and not yet read
    batches = Prefetcher(build, n_steps - start, depth) if depth and n_steps > start else None
    try:
        with _StopFlag() as stop:
            for step in range(start, n_steps):
                hparams = stage.schedule(step)
                try:
                    if batches is None:
                        data.bind(params)  # on-policy data (RL) samples from the current weights; others ignore it
                        batch, snapshot = build()
                    else:
                        batch, snapshot = next(batches)
                except BaseException:
                    if pending is not None:  # the step before did run: log it before the data error ends the run
                        settle(pending)
                    raise
                params, opt_state, out = step_fn(params, opt_state, batch, hparams)
                completed, consumed = step + 1, snapshot
                if pending is not None:  # the step before, read while this one runs
                    settle(pending)
                    pending = None
                eval_due = bool(evaluator) and config.eval_every > 0 and (
                    completed % config.eval_every == 0 or completed == n_steps)
                metrics_due = bool(stage.metrics) and stage.metrics_every > 0 and (
                    completed % stage.metrics_every == 0 or completed == n_steps)
                sample_due = bool(sampler) and (completed % config.sample_every == 0 or completed == n_steps)
                save_due = config.save_every > 0 and completed % config.save_every == 0
                due = eval_due or metrics_due or sample_due or save_due or completed == n_steps
                if pcount == 1:
                    stopping = stop.heard
                elif (due or completed % SYNC_EVERY == 0) and completed < n_steps:
                    # A signal may reach one process only: all must stop (and save) at the same step, so they agree,
                    # at steps every process picks alike.
                    stopping = sharding.any_process(stop.heard)
                else:
                    stopping = False
                if not (due or stopping):
                    pending = (completed, hparams, out, snapshot)
                    if not depth:  # the synchronous loop: read each step before the next is dispatched
                        settle(pending)
                        pending = None
                    continue
                # This step pauses (eval, sample, save, stop, end): read it now, then do the pausing work.
                record = {}
                if completed % config.log_every == 0 or completed == n_steps or stopping:
                    record = measure(completed, hparams, out, snapshot)
                t_pause = time.perf_counter()  # evals, samples and saves are not step time
                if eval_due:
                    val_bpb = validate(params)
                    record = {"step": completed, **record, "val_bpb": val_bpb}
                    log(f"step {completed:>6}/{n_steps} | val bpb {val_bpb:.4f}")
                if metrics_due:
                    extra = stage.metrics(params)
                    record = {"step": completed, **record, **extra}
                    log(f"step {completed:>6}/{n_steps} | " + " | ".join(f"{k} {v:.4f}" for k, v in extra.items()))
                if sample_due:
                    for text in sampler(params):
                        if pidx == 0:
                            log(f"  sample: {text!r}")
                if record:
                    write(record, completed)
                else:
                    jax.block_until_ready(out)
                if save_due or completed == n_steps or stopping:
                    save(completed, {k: v for k, v in record.items() if isinstance(v, (int, float))})
                t_last += time.perf_counter() - t_pause
                if stopping:
                    break
            if pending is not None:
                settle(pending)
    finally:
        if batches is not None:
            batches.close()
    ckpt.wait()
    ckpt.close()
    metrics.close()
    runlog.write_training_section(config, stage.name, derived, start=start, step=completed, target=n_steps,
                                  wall_time_s=time.perf_counter() - t_start, device_kind=device_kind,
                                  n_devices=len(devices))
    if wandb_run:
        wandb_run.finish()
    done = completed >= n_steps
    log(f"{stage.name}: {'finished' if done else 'stopped'} at step {completed:,}; checkpoint in {stage_dir / 'checkpoints'}")
    return Result(stage.name, completed, done, val_bpb, params)


def _maybe_wandb(config, stage_name):
    project = config.get("wandb_project", "")
    if not project or jax.process_index() != 0:
        return None
    try:
        import wandb
    except ImportError:
        print("wandb_project is set but wandb is not installed (pip install wandb); logging locally only", file=sys.stderr)
        return None
    return wandb.init(project=project, name=f"{config.run}-{stage_name}", config=config.to_dict())
