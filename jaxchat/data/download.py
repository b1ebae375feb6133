"""Download pretraining shards into `$JAXCHAT_HOME/data/<dataset>/`.

    python -m jaxchat.data.download -n 8                         # shards 0..7 + the validation shard
    python -m jaxchat.data.download -n 170 --dataset climbmix -w 8
    python -m jaxchat.data.download -n -1 --base-url http://mirror/ # every shard, from a mirror

The pinned validation shard (the dataset's last) is always fetched in addition to the N train
shards, so `-n 8` already gives a trainable, evaluable setup. Each file is checked to be a readable
parquet with a `text` column before it takes its final name; a corrupt download is fetched again,
never kept. Files already present are checked the same way (footer and column, no data read): intact
ones are skipped, so re-running resumes, and damaged ones (truncated, corrupt) are fetched again.
"""
import argparse
import concurrent.futures as cf
import os
import sys
import threading
import time
from pathlib import Path

from jaxchat import paths
from jaxchat.data.datasets import DATASETS, ShardDataset, get_dataset, shard_name
from jaxchat.data.fetch import DamagedFileError, FetchError, fetch
from jaxchat.data.shards import open_shard


class DownloadError(RuntimeError):
    """Some shards could not be downloaded; `failed` maps shard index -> reason."""

    def __init__(self, dataset: str, failed: dict[int, str]):
        names = ", ".join(shard_name(i) for i in sorted(failed))
        details = "\n".join(f"  {shard_name(i)}: {failed[i]}" for i in sorted(failed))
        super().__init__(f"{len(failed)} {dataset} shard(s) failed: {names}\n{details}\nre-run the same command to retry")
        self.failed = failed


def shard_indices(dataset: ShardDataset, n: int) -> list[int]:
    """Train shards 0..n-1 plus the pinned validation shard; `n == -1` means every shard."""
    if n == -1:
        return list(range(dataset.num_shards))
    if not 0 <= n <= dataset.num_shards:
        raise ValueError(
            f"-n {n} is out of range for {dataset.name} ({dataset.num_shards} shards, the last is validation); "
            f"use 0..{dataset.num_shards - 1} train shards, or -n -1 for all"
        )
    return sorted(set(range(n)) | {dataset.val_index})


def shard_url(base_url: str, index: int) -> str:
    return f"{base_url.rstrip('/')}/{shard_name(index)}"


def verify_shard(path: Path) -> None:
    """Raise unless `path` is a readable parquet file with a `text` column (reads metadata only)."""
    try:
        open_shard(path)
    except DamagedFileError as e:  # the what, without the how-to-fix: this is the fix
        raise ValueError(f"{Path(path).name}: {e.problem}") from None


class Progress:
    """Thread-safe counters behind the console line: files done/total, bytes, MB/s, ETA."""

    def __init__(self, total_files: int):
        self.total = total_files
        self.done = 0
        self.bytes = 0
        self.start = time.monotonic()
        self._lock = threading.Lock()

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes += n

    def file_done(self) -> None:
        with self._lock:
            self.done += 1

    def line(self) -> str:
        with self._lock:
            done, nbytes = self.done, self.bytes
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = nbytes / elapsed / 1e6
        # Files are about the same size, so the pace so far over whole files predicts the rest.
        eta = f"{elapsed * (self.total - done) / done:.0f}s" if done else "?"
        return f"{done}/{self.total} files | {_human(nbytes)} | {rate:.1f} MB/s | ETA {eta}"


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000


def download_shards(
    dataset: str,
    n: int,
    base_url: str | None = None,
    workers: int = 4,
    *,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 30,
    log=None,
    log_every_s: float = 2.0,
) -> list[Path]:
    """Fetch train shards 0..n-1 and the validation shard in parallel; returns their paths in index order.

    Raises DownloadError naming every shard that failed (the others are kept, so a re-run resumes).
    """
    log = log or sys.stderr
    ds = get_dataset(dataset)
    base_url = base_url or ds.base_url
    if base_url is None:
        raise ValueError(
            f"dataset {dataset!r} is generated locally by jaxchat.data.tiny_corpus, not downloaded; "
            f"pick one of: {', '.join(k for k, v in DATASETS.items() if v.base_url)}"
        )
    indices = shard_indices(ds, n)
    out_dir = paths.data_dir(dataset)
    progress = Progress(len(indices))

    def one(i: int) -> Path:
        dest = out_dir / shard_name(i)
        if dest.exists():
            try:
                open_shard(dest)
            except DamagedFileError as e:  # fetch() below replaces it; say so, a damaged file is news to the user
                print(f"{dest} is damaged: {e.problem}; fetching it again", file=log, flush=True)
        fetch(shard_url(base_url, i), dest, verify=verify_shard, retries=retries, backoff=backoff,
              timeout=timeout, progress=progress.add_bytes)
        progress.file_done()
        return dest

    print(f"downloading {len(indices)} {dataset} shards to {out_dir} ({workers} workers)", file=log)
    results, failed = {}, {}
    pool = cf.ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        pending = {pool.submit(one, i): i for i in indices}
        while pending:
            finished, _ = cf.wait(pending, timeout=log_every_s, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                i = pending.pop(fut)
                try:
                    results[i] = fut.result()
                except (FetchError, OSError) as e:
                    failed[i] = _reason(e)
            print(progress.line(), file=log, flush=True)
    except BaseException:
        # Ctrl-C: return now rather than wait for files in flight; their .part files resume next run.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    if failed:
        raise DownloadError(dataset, failed)
    return [results[i] for i in indices]


def _reason(e: Exception) -> str:
    """One line per failed shard (FetchError's first line already names the last cause)."""
    return str(e).splitlines()[0] if isinstance(e, FetchError) else f"{type(e).__name__}: {e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxchat.data.download", description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--num-files", type=int, required=True, help="train shards to fetch (-1: all)")
    parser.add_argument("--dataset", default="fineweb-edu", choices=sorted(DATASETS))
    parser.add_argument("--base-url", default=None, help="override the dataset's URL (mirrors, tests)")
    parser.add_argument("-w", "--workers", type=int, default=4)
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry delay in seconds (doubles)")
    parser.add_argument("--timeout", type=float, default=30.0, help="socket timeout in seconds")
    args = parser.parse_args(argv)
    try:
        done = download_shards(args.dataset, args.num_files, args.base_url, args.workers,
                               retries=args.retries, backoff=args.backoff, timeout=args.timeout)
    except (ValueError, DownloadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; partial files are kept and resume when the command is run again", file=sys.stderr, flush=True)
        os._exit(130)  # worker threads may sit in a socket read: don't wait for them
    print(f"{len(done)} shards ready in {paths.data_dir(args.dataset)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
