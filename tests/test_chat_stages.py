"""Mid-training and SFT through `train.py`: they start from the previous stage's weights, resume exactly after SIGTERM,
log SFT's periodic accuracy, evaluate at the end (once per checkpoint), and fail clearly without their source; plus
the horizon estimate and the tiny mixtures' determinism and coverage."""
import json
import re
import shutil
import signal

import numpy as np
import pytest
from fixtures_tok import ByteTokenizer
from test_trainer import FAST, start, train, wait_for

from jaxchat import stages
from jaxchat.data.chat import chat_dataset, mixture_pairs
from jaxchat.tasks.mixtures import mixture

CHAT = ["--config.mid.mixture=tiny", "--config.sft.mixture=tiny", "--config.mid.num_iterations=16",
        "--config.mid.save_every=4", "--config.mid.eval_every=8", "--config.mid.sample_every=0",
        "--config.sft.num_iterations=4", "--config.sft.sample_every=0", "--config.sft.eval_every=4",
        "--config.sft.device_batch_size=4", "--config.sft.sequence_len=64", "--config.sft.metric_every=2",
        "--config.sft.metric_tasks=TinyQuiz", "--config.sft.metric_max_problems=8", "--config.eval.max_problems=4",
        "--config.eval.max_tokens=8", "--config.eval.chat_tasks=Arithmetic,TinyQuiz", "--config.eval.generate_batch=4"]


def chat_train(home, run, *args):
    return train(home, run, *CHAT, *args)


def records(home, run, stage):
    return [json.loads(line) for line in (home / "runs" / run / stage / "metrics.jsonl").read_text().splitlines()]


def losses(home, run, stage):
    return {r["step"]: r["loss"] for r in records(home, run, stage) if "loss" in r}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    proc = train(home, "tok", "--stage=tokenizer")
    assert proc.returncode == 0, proc.stderr
    proc = train(home, "base", "--stage=base", "--config.num_iterations=4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return home


def with_base(home, run):
    shutil.copytree(home / "runs" / "base" / "base", home / "runs" / run / "base")


@pytest.fixture(scope="module")
def straight(home):
    with_base(home, "straight")
    proc = chat_train(home, "straight", "--stage=mid")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_mid_starts_from_base_trains_and_evaluates(home, straight):
    out = straight.stdout
    assert "starting from base step 4" in out
    mid = losses(home, "straight", "mid")
    assert sorted(mid) == list(range(1, 17)) and mid[16] < mid[1]
    val = [r["val_bpb"] for r in records(home, "straight", "mid") if "val_bpb" in r]
    assert len(val) == 3 and val[-1] < val[0]  # steps 0, 8, 16
    evaluation = json.loads((home / "runs" / "straight" / "mid" / "eval.json").read_text())
    assert evaluation["step"] == 16 and set(evaluation["chat"]["tasks"]) == {"Arithmetic", "TinyQuiz"}
    assert evaluation["chat"]["tasks"]["TinyQuiz"]["total"] == 4
    report = json.loads((home / "runs" / "straight" / "mid" / "report.json").read_text())
    assert {"training", "chat_eval"} <= set(report)


def test_mid_resume_after_sigterm_is_exact(home, straight):
    with_base(home, "sigterm")
    proc = start(home, "sigterm", *CHAT, "--stage=mid")
    metrics = home / "runs" / "sigterm" / "mid" / "metrics.jsonl"
    # early enough that the signal lands well before the last of 16 fast steps
    wait_for(lambda: metrics.exists() and len(losses(home, "sigterm", "mid")) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "received SIGTERM" in out, out
    stopped = max(losses(home, "sigterm", "mid"))
    assert stopped < 16
    resumed = chat_train(home, "sigterm", "--stage=mid")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed mid from step {stopped}" in resumed.stdout
    assert losses(home, "sigterm", "mid") == losses(home, "straight", "mid")  # exact float equality


def test_sft_from_mid_logs_accuracy_and_does_not_repeat_its_evaluation(home, straight):
    proc = chat_train(home, "straight", "--stage=sft")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "starting from mid step 16" in proc.stdout
    recs = records(home, "straight", "sft")
    assert [r["step"] for r in recs if "TinyQuiz_acc" in r] == [2, 4]
    assert all(0.0 <= r["TinyQuiz_acc"] <= 1.0 for r in recs if "TinyQuiz_acc" in r)
    lrm = [r["lrm"] for r in recs if "lrm" in r]
    assert lrm[0] == pytest.approx(0.02) and lrm == sorted(lrm, reverse=True)  # init_lr_frac, then linear decay
    again = train(home, "straight", *CHAT, "--stage=all")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "evaluation of step 16 already in" in again.stdout and "evaluation of step 4 already in" in again.stdout
    assert (home / "runs" / "straight" / "report.md").exists()


def test_sft_padded_layout_trains_32_conversations_per_step_through_train_py(home, straight):
    shutil.copytree(home / "runs" / "straight" / "mid", home / "runs" / "padded" / "mid")
    proc = chat_train(home, "padded", "--stage=sft", "--config.sft.layout=padded", "--config.sft.num_iterations=2",
                      "--config.sft.metric_every=-1", "--config.eval.chat_tasks=TinyQuiz")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # 32 conversations of T=64 per step: 4 rows x devices x micro-batches
    accumulation, devices = map(int, re.search(r"sft: 2 steps of 2,048 tokens, (\d+) micro-batches each, (\d+) "
                                               r"device", proc.stdout).groups())
    assert 4 * devices * accumulation == 32
    assert sorted(losses(home, "padded", "sft")) == [1, 2]


def test_sft_without_its_source_names_the_command(home):
    proc = chat_train(home, "nosource", "--stage=sft")
    assert proc.returncode != 0
    assert "no mid checkpoint" in proc.stderr and "--stage=mid" in proc.stderr


def test_packing_estimate_matches_the_real_packer():
    tok = ByteTokenizer()
    tasks = mixture("sft", "tiny")[:2]
    seq_len = 96
    estimated = stages.epoch_steps(tasks, tok, seq_len, rows_per_step=8, layout="packed", sample=500)
    it = iter(chat_dataset(tasks, tok, 8, seq_len, mode="packed", seed=0))
    steps = 0
    while it.progress < 1.0:
        next(it)
        steps += 1
    assert abs(estimated - steps) / steps < 0.05, (estimated, steps)
    assert stages.epoch_steps(tasks, tok, seq_len, rows_per_step=8, layout="padded") == sum(map(len, tasks)) // 8


@pytest.mark.parametrize("n_devices, accumulation", [(8, 1), (4, 2), (1, 8)])
def test_sft_padded_takes_exactly_rows_over_32_steps_of_32_conversations(n_devices, accumulation):
    """d20's SFT is the reference's V0: one conversation per row, target_examples_per_step 32 = device_batch_size 4 x
    devices x accumulation, num_iterations = (len(train_ds) // 32) * num_epochs, so 22,443 rows -> 701 steps."""
    from jaxchat.config import load_config_file

    c = load_config_file("configs/d20.py")
    assert c.sft.layout == "padded" and c.sft.target_examples_per_step == 32 and c.sft.device_batch_size == 4
    assert load_config_file("configs/tiny.py").sft.layout == "packed"
    tasks = [[{}] * 20_000, [{}] * 2_443]  # padded rows need only the count
    sc, d = stages.chat_horizon(c, "sft", tasks, tokenizer=None, n_devices=n_devices)
    assert sc.num_iterations == d.num_iterations == 22_443 // 32 == 701
    assert d.total_batch_size == 32 * 2048 and d.grad_accum_steps == accumulation
    assert d.device_batch_size * n_devices * d.grad_accum_steps == 32  # conversations per step
    c.sft.num_epochs = 2
    assert stages.chat_horizon(c, "sft", tasks, None, n_devices)[0].num_iterations == 1402


def test_tiny_mixture_is_deterministic_and_covers_every_example_once_per_epoch():
    tasks = mixture("mid", "tiny")
    assert tasks[2] is tasks[3]  # identity listed twice: oversampled by repetition
    pairs = mixture_pairs(tasks)
    assert len(pairs) == sum(len(t) for t in tasks)
    from jaxchat.data.chat import mixture as stream

    a = list(stream(tasks[:2], seed=3, num_epochs=1))
    b = list(stream(tasks[:2], seed=3, num_epochs=1))
    assert a == b and len(a) == len(tasks[0]) + len(tasks[1])
    keys = {json.dumps(c, sort_keys=True) for c in a}
    expected = {json.dumps(t[i], sort_keys=True) for t in tasks[:2] for i in range(len(t))}
    assert keys == expected
    counts = np.bincount([t for t, _ in pairs], minlength=len(tasks))
    assert counts[2] == counts[3] == len(tasks[2])


def evaluate_cli(home, run, *args):
    import subprocess
    import sys

    from test_trainer import REPO, env

    cmd = [sys.executable, "-m", "jaxchat.evaluate", *FAST, *CHAT, f"--config.run={run}", *args]
    offline = dict(env(home), JAXCHAT_OFFLINE="1")  # CORE's bundle would be downloaded otherwise
    return subprocess.run(cmd, cwd=REPO, env=offline, capture_output=True, text=True, timeout=300)


def test_evaluate_cli_runs_chosen_tasks_and_reports_bad_input(home, straight):
    proc = evaluate_cli(home, "straight", "--stage=mid", "--tasks=TinyQuiz,CORE")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TinyQuiz" in proc.stdout and "CORE skipped" in proc.stdout  # no bundle offline: skipped, not fatal
    evaluation = json.loads((home / "runs" / "straight" / "mid" / "eval.json").read_text())
    assert "CORE" in evaluation["skipped"] and evaluation["step"] == 16
    assert set(evaluation["chat"]["tasks"]) == {"Arithmetic", "TinyQuiz"}  # merged with the end-of-stage results
    bad = evaluate_cli(home, "straight", "--stage=mid", "--tasks=GSM9K")
    assert bad.returncode == 2 and "unknown task(s) GSM9K" in bad.stderr
    missing = evaluate_cli(home, "nothing-here", "--stage=rl")
    assert missing.returncode == 2 and "no rl checkpoint" in missing.stderr
