"""The report card: the summary table comes first with exact values, plots are real PNGs, the environment names
the commit and versions, and damaged inputs cost a warning, never the report."""
import os
import subprocess
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from test_runlog import write_metrics

from jaxchat import paths
from jaxchat.evaluate import report
from jaxchat.runlog import write_section

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SFT_CHAT = {"ARC-Easy": 0.3876, "ARC-Challenge": 0.2807, "MMLU": 0.3151, "GSM8K": 0.0455, "HumanEval": 0.0854,
            "SpellingBee": 0.9812, "ChatCORE": 0.0884, "ChatCORE_cat": 0.1234, "TinyQuiz": 0.5, "wall_time_s": 12.5}


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_HOME", str(tmp_path))
    return tmp_path


def fake_run(run: str = "fake") -> None:
    write_section(run, "tokenizer", "tokenizer", {
        "vocab_size": 1536, "chars": 2_000_000, "train_time_s": 12.5, "wall_time_s": 14.0,
        "compression": [{"text": "news", "bytes": 1000, "ours_tokens": 300, "ours_ratio": 3.333}], "notes": []})
    write_section(run, "base", "training", {
        "steps": 40, "target_steps": 40, "wall_time_s": 20.0, "total_wall_time_s": 3600.0, "tokens_per_step": 4096,
        "final_loss_smoothed": np.float32(2.5), "val_bpb": np.float64(0.81),
        "config": {"depth": 4, "sequence_len": 256, "matrix_lr": 0.02}})
    write_section(run, "base", "core", {"CORE": np.float64(0.2219), "arc_easy (centered)": 0.5, "wall_time_s": 60.0})
    write_section(run, "sft", "training", {"steps": 20, "tokens_per_step": 1024, "wall_time_s": 120.0})
    write_section(run, "sft", "chat_eval", {k: np.float32(v) if k == "MMLU" else v for k, v in SFT_CHAT.items()})
    write_section(run, "mid", "chat_eval", {"gsm8k": 0.025})  # names match ignoring case and punctuation
    write_metrics(paths.run_dir(run, "base") / "metrics.jsonl", 40, 9.0, resume_at=25)
    write_metrics(paths.run_dir(run, "sft") / "metrics.jsonl", 20, 3.0)


def tables(markdown: str) -> list[list[str]]:
    out, current = [], None
    for line in markdown.splitlines():
        if line.startswith("|"):
            if current is None:
                current = []
                out.append(current)
            current.append(line)
        else:
            current = None
    return out


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_summary_table_first_with_exact_values(home):
    fake_run()
    path = report.render("fake")
    assert path == home / "runs" / "fake" / "report.md"
    text = path.read_text()
    assert text.startswith("# jaxchat report: fake")
    summary = tables(text)[0]
    assert cells(summary[0]) == ["Metric", "BASE", "MID", "SFT", "RL"]
    rows = {cells(line)[0]: cells(line)[1:] for line in summary[2:]}
    # the reference's rows, then any other evaluated task (the tiny run's synthetic ones), ChatCORE last
    assert list(rows) == ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee",
                          "ChatCORE_cat", "TinyQuiz", "ChatCORE"]
    assert rows["CORE"] == ["0.2219", "—", "—", "—"]
    assert rows["ARC-Easy"] == ["—", "—", "0.3876", "—"]  # CORE's own arc_easy does not leak into the chat row
    assert rows["MMLU"] == ["—", "—", "0.3151", "—"]
    assert rows["GSM8K"] == ["—", "0.0250", "0.0455", "—"]
    assert rows["SpellingBee"] == ["—", "—", "0.9812", "—"]
    assert rows["ChatCORE"] == ["—", "—", "0.0884", "—"]
    # tokenizer 14 s + base (cumulative 3600 s + CORE 60 s) + sft (120 s + its chat eval 12.5 s); a timing is no row
    assert "Total wall clock: 1h03m26s (tokenizer 0m14s, base 1h01m00s, sft 2m12s)" in text
    # stage sections follow in pipeline order, nested data as their own tables
    order = [text.index(h) for h in ("## Environment", "## Tokenizer", "## Base model", "## Midtraining", "## Chat SFT",
                                     "## Plots")]
    assert order == sorted(order)
    assert "| final_loss_smoothed | 2.5000 |" in text and "| total_wall_time_s | 3,600.0 s (1h00m00s) |" in text
    assert "**compression**" in text and "| news | 1,000 | 300 | 3.3330 |" in text
    assert "| TinyQuiz | 0.5000 |" in text  # tasks outside the summary still appear in their stage


def test_plots_are_png_and_linked(home):
    fake_run()
    text = report.render("fake").read_text()
    run_dir = home / "runs" / "fake"
    for name in (report.LOSS_PLOT, report.BPB_PLOT):
        data = (run_dir / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
        assert f"]({name})" in text  # relative link, renders beside report.md


def test_environment_header(home):
    fake_run()
    text = report.render("fake").read_text()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert commit and f"commit {commit}" in text
    for package in ("jax", "flax", "optax", "orbax-checkpoint"):
        assert f"{package} {metadata.version(package)}" in text
    assert "- Accelerators: 4 × cpu (cpu)" in text  # conftest's emulated devices
    assert "- Run started: " in text and "(approx.)" in text
    code = report.code_size()
    assert code["files"] > 10 and code["lines"] > 1000
    assert f"{code['chars']:,} characters, {code['lines']:,} lines, {code['files']:,} files" in text
    assert os.uname().nodename not in text.split("## Tokenizer")[0]


def test_corrupt_inputs_warn_and_still_render(home):
    fake_run()
    run_dir = home / "runs" / "fake"
    (run_dir / "sft" / "report.json").write_text("{not json")
    with (run_dir / "base" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 41, "loss": 1.0, "ela')  # a line cut by a crash
    (run_dir / "rl").mkdir()
    (run_dir / "rl" / "metrics.jsonl").write_text("[1, 2]\n")
    with pytest.warns(UserWarning) as caught:
        text = report.render("fake").read_text()
    messages = [str(w.message) for w in caught]
    assert any(str(run_dir / "sft" / "report.json") in m for m in messages)
    assert any(str(run_dir / "base" / "metrics.jsonl") in m and "line 42" in m for m in messages)
    assert any(str(run_dir / "rl" / "metrics.jsonl") in m for m in messages)
    rows = {cells(line)[0]: cells(line)[1:] for line in tables(text)[0][2:]}
    assert rows["CORE"][0] == "0.2219" and rows["ChatCORE"] == ["—", "—", "—", "—"]  # sft's sections are gone
    assert (run_dir / report.LOSS_PLOT).exists()  # sft's metrics still plot without its section (steps only)


def test_missing_everything_renders_an_empty_card(home):
    text = report.render("nothing").read_text()
    rows = {cells(line)[0]: cells(line)[1:] for line in tables(text)[0][2:]}
    assert all(v == ["—"] * 4 for v in rows.values())
    assert "Total wall clock: —" in text and "## Plots" not in text


def test_cli(home, capsys):
    assert report.main(["--config=configs/tiny.py", "--config.run=cli"]) == 2
    assert "no run directory" in capsys.readouterr().err
    write_section("cli", "base", "core", {"CORE": 0.1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean run must render without a single warning
        assert report.main([f"--config={REPO / 'configs' / 'tiny.py'}", "--config.run=cli"]) == 0
    assert capsys.readouterr().out.strip() == str(home / "runs" / "cli" / "report.md")


def test_value_formatting():
    assert report.format_value(3_735_552.0) == "3,735,552"
    assert report.format_value(1234.56) == "1,234.6"
    assert report.format_value(4.2e19) == "4.2000e+19"
    assert report.format_value(0.0039) == "0.0039" and report.format_value(3.9e-5) == "3.9e-05"
    assert report.format_value(3723.0, "wall_time_s") == "3,723.0 s (1h02m03s)"
    assert report.format_value(None) == "—" and report.format_value(True) == "yes"
