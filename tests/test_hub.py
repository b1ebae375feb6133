"""Task datasets through the hub's parquet listing, served by a loopback stand-in for the hub."""
import io
import json
import socket

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from http_server import FileServer

from jaxchat.data import hub
from jaxchat.data.fetch import DamagedFileError

REPO, SUBSET, SPLIT = "org/toy-task", "default", "train"
LISTING = f"/api/datasets/{REPO}/parquet/{SUBSET}/{SPLIT}"
FAST = dict(retries=2, backoff=0.001, timeout=5)


def parquet_bytes(start: int, rows: int) -> bytes:
    table = pa.table({"question": [f"q{i}" for i in range(start, start + rows)],
                      "choices": [{"text": ["a", "b"], "label": ["A", "B"]}] * rows})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def serve_split(srv: FileServer, repo=REPO, subset=SUBSET, split=SPLIT, rows=(30, 20)) -> list[str]:
    """Put a split's parquet files and its listing on `srv`, the way the hub lays them out."""
    base = f"/api/datasets/{repo}/parquet/{subset}/{split}"
    urls, start = [], 0
    for i, n in enumerate(rows):
        srv.add(f"{base}/{i}.parquet", parquet_bytes(start, n))
        urls.append(srv.url(f"{base}/{i}.parquet"))
        start += n
    srv.add(base, json.dumps(urls).encode())
    return urls


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_HOME", str(tmp_path / "home"))
    for var in ("JAXCHAT_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


@pytest.fixture
def hub_server(home, monkeypatch):
    with FileServer() as srv:
        monkeypatch.setenv("JAXCHAT_HUB_ENDPOINT", srv.base_url)
        yield srv


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_listing_then_files_then_manifest(home, hub_server):
    urls = serve_split(hub_server)
    table = hub.load_hub_dataset(REPO, SUBSET, SPLIT, **FAST)
    assert table.num_rows == 50
    assert table.column("question").to_pylist() == [f"q{i}" for i in range(50)]  # listing order kept
    d = hub.dataset_dir(REPO, SUBSET, SPLIT)
    assert d == home / "tasks" / "org--toy-task" / "default" / "train"
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["files"] == ["00000.parquet", "00001.parquet"]
    assert manifest["urls"] == urls and manifest["num_rows"] == 50 and manifest["fetched_at"]
    assert sorted(p.name for p in d.iterdir()) == ["00000.parquet", "00001.parquet", "manifest.json"]
    assert [r.path for r in hub_server.requests()][0] == LISTING


def test_cached_split_loads_with_the_server_gone(hub_server):
    serve_split(hub_server)
    first = hub.load_hub_dataset(REPO, SUBSET, SPLIT, **FAST)
    hub_server.stop()
    assert hub.load_hub_dataset(REPO, SUBSET, SPLIT, **FAST).equals(first)


def test_cached_split_loads_in_offline_mode(hub_server, monkeypatch):
    serve_split(hub_server)
    hub.load_hub_dataset(REPO, SUBSET, SPLIT, **FAST)
    n = len(hub_server.requests())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.load_hub_dataset(REPO, SUBSET, SPLIT).num_rows == 50
    assert len(hub_server.requests()) == n


def test_cold_cache_unreachable_hub_raises_one_clear_error(home, monkeypatch):
    monkeypatch.setenv("JAXCHAT_HUB_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(hub.HubDatasetUnavailable) as e:
        hub.load_hub_dataset(REPO, SUBSET, SPLIT, retries=1, backoff=0.001)
    msg = str(e.value)
    assert f"{REPO} [{SUBSET}/{SPLIT}]" in msg
    assert f"python -m jaxchat.data.hub fetch {REPO} {SUBSET} {SPLIT}" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # one error, not a chain


def test_cold_cache_offline_mode_fails_without_touching_the_network(hub_server, monkeypatch):
    serve_split(hub_server)
    monkeypatch.setenv("JAXCHAT_OFFLINE", "1")
    with pytest.raises(hub.HubDatasetUnavailable, match="(?s)offline mode.*python -m jaxchat.data.hub fetch"):
        hub.load_hub_dataset(REPO, SUBSET, SPLIT)
    assert hub_server.requests() == []


def test_directory_without_manifest_is_fetched_again(hub_server):
    serve_split(hub_server)
    hub.load_hub_dataset(REPO, SUBSET, SPLIT, **FAST)
    d = hub.dataset_dir(REPO, SUBSET, SPLIT)
    (d / "manifest.json").unlink()
    (d / "00001.parquet").write_bytes(b"half a file")  # what an interrupted run may leave
    table = hub.load_hub_dataset(REPO, SUBSET, SPLIT, **FAST)
    assert table.num_rows == 50
    assert [r.path for r in hub_server.requests()].count(LISTING) == 2
    assert (d / "manifest.json").exists() and pq.ParquetFile(d / "00001.parquet").metadata.num_rows == 20


def test_manifest_naming_a_missing_file_counts_as_incomplete(hub_server):
    serve_split(hub_server)
    hub.load_hub_dataset(REPO, SUBSET, SPLIT, **FAST)
    d = hub.dataset_dir(REPO, SUBSET, SPLIT)
    (d / "00000.parquet").unlink()
    assert hub.read_manifest(d) is None
    assert hub.load_hub_dataset(REPO, SUBSET, SPLIT, **FAST).num_rows == 50


def test_a_damaged_cached_file_is_a_clear_error_and_the_fetch_command_replaces_just_it(hub_server, monkeypatch):
    serve_split(hub_server)
    hub.load_hub_dataset(REPO, SUBSET, SPLIT, **FAST)
    d = hub.dataset_dir(REPO, SUBSET, SPLIT)
    intact = (d / "00000.parquet").read_bytes()
    (d / "00001.parquet").write_bytes((d / "00001.parquet").read_bytes()[:-40])  # truncated: the footer is gone
    monkeypatch.setenv("JAXCHAT_OFFLINE", "1")  # loading never re-fetches behind the user's back
    with pytest.raises(DamagedFileError) as e:
        hub.load_hub_dataset(REPO, SUBSET, SPLIT)
    msg = str(e.value)
    assert str(d / "00001.parquet") in msg and "truncated" in msg
    assert f"`python -m jaxchat.data.hub fetch {REPO} {SUBSET} {SPLIT}`" in msg
    before = len(hub_server.requests())
    assert hub.main(["fetch", REPO, SUBSET, SPLIT, "--backoff", "0.001"]) == 0
    assert [r.path for r in hub_server.requests()[before:]] == [f"{LISTING}/1.parquet"]  # only the damaged file
    assert (d / "00000.parquet").read_bytes() == intact
    assert hub.load_hub_dataset(REPO, SUBSET, SPLIT).num_rows == 50
    (d / "00000.parquet").write_bytes(b"PAR1" + b"x" * (len(intact) - 4))  # right size, garbage: footer unreadable
    with pytest.raises(DamagedFileError, match="not a readable parquet file"):
        hub.load_hub_dataset(REPO, SUBSET, SPLIT)


def test_corrupt_and_failing_downloads_are_retried(hub_server):
    serve_split(hub_server)
    hub_server.fail(LISTING, times=1)
    hub_server.corrupt(f"{LISTING}/0.parquet")
    hub_server.truncate(f"{LISTING}/1.parquet", after=100)
    assert hub.load_hub_dataset(REPO, SUBSET, SPLIT, **FAST).num_rows == 50


def test_unknown_split_names_the_problem(hub_server):
    with pytest.raises(hub.HubDatasetUnavailable, match="HTTP 404.*check the repo, subset and split"):
        hub.load_hub_dataset(REPO, SUBSET, "nope", **FAST)
    assert len(hub_server.requests()) == 1


def test_cli_fetch_and_fetch_all(hub_server, monkeypatch, capsys):
    serve_split(hub_server)
    serve_split(hub_server, repo="org/other", subset="main", split="test", rows=(7,))
    assert hub.main(["fetch", REPO, SUBSET, SPLIT, "--backoff", "0.001"]) == 0
    assert "50 rows" in capsys.readouterr().out
    monkeypatch.setattr(hub, "TASK_DATASETS", (
        hub.HubSplit(REPO, SUBSET, SPLIT, "toy"),
        hub.HubSplit("org/other", "main", "test", "toy"),
        hub.HubSplit("org/missing", "main", "test", "toy"),
    ))
    words = "\r\n".join(a + b + c for a in "abcdefghijklmnopqrstuvwxyz" for b in "abcdefghijklmnopqrstuvwxyz"
                          for c in "abcdefghijklmnopqrstuvwxyz").encode()
    hub_server.add("/words_alpha.txt", words)
    monkeypatch.setenv("JAXCHAT_WORDS_URL", hub_server.url("/words_alpha.txt"))
    assert hub.main(["fetch-all", "--backoff", "0.001", "--retries", "0"]) == 1
    out, err = capsys.readouterr()
    assert "7 rows" in out and "org/missing main test" in err
    assert "17,576 words words_alpha.txt" in out  # the spelling tasks' word list comes with the task datasets
    assert hub.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "not cached  org/missing" in out and "cached  words_alpha.txt" in out


def test_task_table_uses_the_reference_names():
    names = {(s.repo_id, s.subset, s.split) for s in hub.TASK_DATASETS}
    assert names == {
        ("allenai/ai2_arc", "ARC-Easy", "train"), ("allenai/ai2_arc", "ARC-Easy", "test"),
        ("allenai/ai2_arc", "ARC-Challenge", "train"), ("allenai/ai2_arc", "ARC-Challenge", "test"),
        ("cais/mmlu", "all", "test"), ("cais/mmlu", "all", "auxiliary_train"),  # HEAD's flat aux-train rows
        ("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test"),
        ("openai/openai_humaneval", "openai_humaneval", "test"),
        ("HuggingFaceTB/smol-smoltalk", "default", "train"), ("HuggingFaceTB/smol-smoltalk", "default", "test"),
    }


def test_listing_url_matches_the_hub_api(monkeypatch):
    monkeypatch.delenv("JAXCHAT_HUB_ENDPOINT", raising=False)
    assert hub.listing_url("allenai/ai2_arc", "ARC-Easy", "test") == \
        "https://huggingface.co/api/datasets/allenai/ai2_arc/parquet/ARC-Easy/test"


def test_shuffle_is_numpy_default_rng_permutation():
    # np.random.default_rng(42).permutation(10), the order HF datasets' .shuffle(seed=42) gives 10 rows.
    assert hub.shuffled_indices(10, 42).tolist() == [5, 6, 0, 7, 3, 2, 4, 9, 1, 8]
    big = hub.shuffled_indices(1000, 42)
    assert np.array_equal(big, hub.shuffled_indices(1000, 42))
    assert sorted(big.tolist()) == list(range(1000))
    assert not np.array_equal(big, hub.shuffled_indices(1000, 43))
