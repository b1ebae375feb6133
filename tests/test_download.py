"""fetch() and the shard downloader against a loopback server that misbehaves on purpose."""
import io
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from http_server import FileServer

from jaxchat import paths
from jaxchat.data import download
from jaxchat.data.datasets import get_dataset, shard_name
from jaxchat.data.fetch import FetchError, fetch, part_path

FAST = dict(retries=4, backoff=0.001, timeout=5)
VAL = get_dataset("fineweb-edu").val_index  # 1822: shard_01822.parquet, the pinned validation shard


def parquet_bytes(index: int, rows: int = 200, column: str = "text") -> bytes:
    texts = [f"shard {index} document {i}: " + "lorem ipsum " * (i % 7) for i in range(rows)]
    buf = io.BytesIO()
    pq.write_table(pa.table({column: texts}), buf, row_group_size=64)
    return buf.getvalue()


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def shards():
    """Train shards 0, 1 and the validation shard, served by a loopback server."""
    files = {shard_name(i): parquet_bytes(i) for i in (0, 1, VAL)}
    with FileServer(files) as srv:
        yield srv, files


# -- fetch ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [500, 503, 408, 429])
def test_fetch_retries_transient_statuses(tmp_path, status):
    with FileServer({"f.bin": b"x" * 5000}) as srv:
        srv.fail("f.bin", times=2, status=status)
        dest = fetch(srv.url("f.bin"), tmp_path / "f.bin", **FAST)
        assert dest.read_bytes() == b"x" * 5000
        assert [r.status for r in srv.requests("f.bin")] == [status, status, 200]


def test_fetch_resumes_dropped_connection_with_range(tmp_path):
    data = bytes(range(256)) * 40
    with FileServer({"f.bin": data}) as srv:
        srv.drop("f.bin", after=3000)
        dest = fetch(srv.url("f.bin"), tmp_path / "f.bin", **FAST)
        assert dest.read_bytes() == data
        assert srv.ranges("f.bin") == ["bytes=3000-"]
        assert srv.requests("f.bin")[-1].status == 206


def test_fetch_resumes_truncated_body(tmp_path):
    data = bytes(range(256)) * 40
    with FileServer({"f.bin": data}) as srv:
        srv.truncate("f.bin", after=1234, times=2)  # second cut lands inside the resumed range
        dest = fetch(srv.url("f.bin"), tmp_path / "f.bin", **FAST)
        assert dest.read_bytes() == data
        assert srv.ranges("f.bin") == ["bytes=1234-", "bytes=2468-"]
        assert not part_path(dest).exists()


def test_fetch_restarts_from_zero_when_server_ignores_range(tmp_path):
    data = bytes(range(256)) * 40
    with FileServer({"f.bin": data}, ranges=False) as srv:
        srv.drop("f.bin", after=3000)
        dest = fetch(srv.url("f.bin"), tmp_path / "f.bin", **FAST)
        assert dest.read_bytes() == data  # not 3000 stale bytes + the whole file
        assert [r.status for r in srv.requests("f.bin")] == [200, 200]
        assert srv.ranges("f.bin") == ["bytes=3000-"]


def test_fetch_restarts_stale_part_past_the_end(tmp_path):
    data = b"y" * 1000
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(b"z" * 2000)  # left over from some other, bigger file
    with FileServer({"f.bin": data}) as srv:
        fetch(srv.url("f.bin"), dest, **FAST)
        assert [r.status for r in srv.requests("f.bin")] == [416, 200]
    assert dest.read_bytes() == data


def test_fetch_retries_after_timeout(tmp_path):
    with FileServer({"f.bin": b"ok"}) as srv:
        srv.stall("f.bin", seconds=1.0)
        dest = fetch(srv.url("f.bin"), tmp_path / "f.bin", retries=2, backoff=0.001, timeout=0.2)
        assert dest.read_bytes() == b"ok"


def test_fetch_refetches_file_that_fails_verification(tmp_path):
    data = parquet_bytes(0)
    with FileServer({"s.parquet": data}) as srv:
        srv.corrupt("s.parquet")
        dest = fetch(srv.url("s.parquet"), tmp_path / "s.parquet", verify=download.verify_shard, **FAST)
        assert dest.read_bytes() == data
        assert [r.fault for r in srv.requests("s.parquet")] == ["corrupt", None]
        assert srv.ranges("s.parquet") == []  # the bad bytes were discarded, not resumed


def test_fetch_404_fails_at_once_naming_url_and_status(tmp_path):
    with FileServer({}) as srv:
        with pytest.raises(FetchError, match=r"HTTP 404.*not retrying") as e:
            fetch(srv.url("missing.bin"), tmp_path / "m.bin", **FAST)
        assert srv.url("missing.bin") in str(e.value) and e.value.status == 404
        assert len(srv.requests("missing.bin")) == 1
    assert not (tmp_path / "m.bin").exists()


def test_fetch_gives_up_after_retries_and_reports_each_attempt(tmp_path):
    with FileServer({"f.bin": b"x"}) as srv:
        srv.fail("f.bin", times=10)
        with pytest.raises(FetchError, match=r"after 3 attempt\(s\)") as e:
            fetch(srv.url("f.bin"), tmp_path / "f.bin", retries=2, backoff=0.001)
        lines = str(e.value).splitlines()
        assert "last error: HTTP 500" in lines[0]
        assert [line.strip()[:10] for line in lines[1:]] == ["attempt 1:", "attempt 2:", "attempt 3:"]
        assert len(srv.requests("f.bin")) == 3


def test_fetch_connection_refused_is_retried_then_reported(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetchError, match=r"after 2 attempt\(s\)"):
        fetch(f"http://127.0.0.1:{port}/x", tmp_path / "x", retries=1, backoff=0.001)


def test_fetch_skips_valid_dest_and_replaces_invalid_one(tmp_path):
    data = parquet_bytes(0)
    with FileServer({"s.parquet": data}) as srv:
        dest = tmp_path / "s.parquet"
        dest.write_bytes(data)
        fetch(srv.url("s.parquet"), dest, verify=download.verify_shard, **FAST)
        assert srv.requests() == []
        dest.write_bytes(b"not parquet")
        fetch(srv.url("s.parquet"), dest, verify=download.verify_shard, **FAST)
        assert dest.read_bytes() == data and len(srv.requests()) == 1


def test_fetch_reports_progress_in_bytes(tmp_path):
    data = b"p" * (3 << 20)  # several 1 MiB chunks
    seen = []
    with FileServer({"f.bin": data}) as srv:
        srv.drop("f.bin", after=100_000)
        fetch(srv.url("f.bin"), tmp_path / "f.bin", progress=seen.append, **FAST)
    assert sum(seen) == len(data) and len(seen) >= 4


# -- shard downloader ----------------------------------------------------------------------------

def test_shard_indices_add_pinned_validation_shard():
    ds = get_dataset("fineweb-edu")
    assert download.shard_indices(ds, 2) == [0, 1, 1822]
    assert download.shard_indices(ds, 0) == [1822]
    assert download.shard_indices(ds, -1) == list(range(1823))
    assert download.shard_indices(get_dataset("climbmix"), 3) == [0, 1, 2, 6542]
    with pytest.raises(ValueError, match="-n -1"):
        download.shard_indices(ds, 5000)


def test_every_shard_ends_complete_despite_faults(home, shards):
    srv, files = shards
    srv.fail(shard_name(0), times=2)
    srv.drop(shard_name(0), after=500)
    srv.truncate(shard_name(1), after=700)
    srv.corrupt(shard_name(VAL))
    got = download.download_shards("fineweb-edu", 2, srv.base_url, workers=3, **FAST)
    assert [p.name for p in got] == [shard_name(0), shard_name(1), shard_name(VAL)]
    for p in got:
        assert p.parent == paths.data_dir("fineweb-edu")
        assert p.read_bytes() == files[p.name]
        assert pq.read_table(p).column("text").to_pylist()[0].startswith("shard")
    assert sorted(f.name for f in got[0].parent.iterdir()) == sorted(files)  # no .part left behind
    assert srv.ranges(shard_name(0)) == ["bytes=500-"]


def test_shard_without_text_column_is_never_kept(home):
    with FileServer({shard_name(0): parquet_bytes(0, column="content"), shard_name(VAL): parquet_bytes(VAL)}) as srv:
        with pytest.raises(download.DownloadError, match="shard_00000.parquet") as e:
            download.download_shards("fineweb-edu", 1, srv.base_url, **FAST)
        assert "'text' column" in str(e.value)
        assert len(srv.requests(shard_name(0))) == 5  # each bad copy re-fetched, then given up
    assert not (paths.data_dir("fineweb-edu") / shard_name(0)).exists()
    assert (paths.data_dir("fineweb-edu") / shard_name(VAL)).exists()


def test_missing_shard_fails_naming_it_and_keeps_the_rest(home, shards):
    srv, _ = shards
    srv.remove(shard_name(1))
    with pytest.raises(download.DownloadError) as e:
        download.download_shards("fineweb-edu", 2, srv.base_url, **FAST)
    assert e.value.failed.keys() == {1} and "HTTP 404" in str(e.value)
    assert len(srv.requests(shard_name(1))) == 1
    assert sorted(p.name for p in paths.data_dir("fineweb-edu").iterdir()) == [shard_name(0), shard_name(VAL)]


def test_rerun_skips_shards_already_present(home, shards):
    srv, _ = shards
    download.download_shards("fineweb-edu", 2, srv.base_url, **FAST)
    before = len(srv.requests())
    download.download_shards("fineweb-edu", 2, srv.base_url, **FAST)
    assert len(srv.requests()) == before


def test_rerun_replaces_a_damaged_shard_it_already_has(home, shards, capsys):
    srv, files = shards
    download.download_shards("fineweb-edu", 2, srv.base_url, **FAST)
    damaged = paths.data_dir("fineweb-edu") / shard_name(1)
    damaged.write_bytes(files[shard_name(1)][:-100])  # truncated: the parquet footer is gone
    before = len(srv.requests())
    download.download_shards("fineweb-edu", 2, srv.base_url, **FAST)
    assert [r.path for r in srv.requests()[before:]] == ["/" + shard_name(1)]  # only the damaged one
    assert damaged.read_bytes() == files[shard_name(1)]
    assert f"{damaged} is damaged" in capsys.readouterr().err


def _truncated_home(home):
    """fineweb-edu shards 0 (truncated) and the validation shard, as a cut-short download or copy leaves them."""
    d = paths.data_dir("fineweb-edu")
    d.mkdir(parents=True)
    (d / shard_name(0)).write_bytes(parquet_bytes(0)[:-100])
    (d / shard_name(VAL)).write_bytes(parquet_bytes(VAL))
    return d / shard_name(0)


def test_a_truncated_shard_is_a_clear_error_naming_it_and_the_command(home):
    from jaxchat.data.fetch import DamagedFileError
    from jaxchat.data.pretrain import row_group_refs
    from jaxchat.data.shards import list_shards, read_row_group

    bad = _truncated_home(home)
    train, val = list_shards("fineweb-edu")
    for read in (lambda: row_group_refs(train), lambda: read_row_group(bad, 0)):  # start-up, and any later read
        with pytest.raises(DamagedFileError) as e:
            read()
        msg = str(e.value)
        assert str(bad) in msg and "Parquet magic bytes not found" in msg
        assert "`python -m jaxchat.data.download -n 1 --dataset fineweb-edu`" in msg  # puts shard 0 back
    assert row_group_refs([val])  # the intact one reads


def test_train_py_stops_on_a_truncated_shard_with_the_clear_error(home):
    import os
    import subprocess
    import sys
    from pathlib import Path

    bad = _truncated_home(home)
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "train.py", "--config=configs/tiny.py", "--config.dataset=fineweb-edu",
                           "--config.run=damaged", "--stage=tokenizer"], cwd=repo, capture_output=True, text=True,
                          env=dict(os.environ, JAXCHAT_HOME=str(home)), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {bad} is damaged" in proc.stderr
    assert "python -m jaxchat.data.download -n 1 --dataset fineweb-edu" in proc.stderr


def test_tiny_dataset_is_refused_with_the_generator_named(home):
    with pytest.raises(ValueError, match="tiny_corpus"):
        download.download_shards("tiny", 1)


def test_cli_downloads_train_and_val_shards(home, shards, capsys):
    srv, files = shards
    rc = download.main(["-n", "2", "--base-url", srv.base_url, "--backoff", "0.001"])
    assert rc == 0
    assert sorted(p.name for p in paths.data_dir("fineweb-edu").iterdir()) == sorted(files)
    err = capsys.readouterr().err
    assert "3/3 files" in err and "MB/s" in err and "ETA" in err


def test_cli_exits_nonzero_naming_failed_shards(home, shards, capsys):
    srv, _ = shards
    srv.remove(shard_name(VAL))
    rc = download.main(["-n", "2", "--base-url", srv.base_url, "--backoff", "0.001", "-w", "2"])
    assert rc == 1
    assert shard_name(VAL) in capsys.readouterr().err
