"""Fetch the shards a reader needs next, ahead of it, in background threads.

The epoch plan is a pure function of (seed, epoch), so each rank and DataLoader worker knows
the batches it will read, in order. The prefetcher walks that sequence of (batch, shard)
reads and fetches each shard not yet in the cache while it is at most `depth` reads past
the end of the batch being read, with at most `threads` downloads in flight. The cache's per-shard lock
means a shard the reader asks for while it is being prefetched is waited for, not fetched
twice. A prefetch that fails is recorded on the reader so its own read fails fast with the
same error (named with the URL and the sample key) instead of retrying again.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from midas_data.storage.fetch import FetchError

MATCH_WINDOW = 64  # planned batches searched forward when the reader reports a batch


class Prefetcher:
    def __init__(self, reader, batches: list[np.ndarray], depth: int, threads: int):
        self.pid = os.getpid()
        self.reader, self.depth = reader, max(1, int(depth))
        # Shards in the order the reader opens them (a shard read again right away is
        # listed once), and the batch of each; batch_start[b]: first entry of batch >= b.
        self.seq: list[int] = []
        owner: list[int] = []
        self.batch_key: list[tuple[int, int]] = []
        for b, rows in enumerate(batches):
            rows = np.asarray(rows, dtype=np.int64)
            self.batch_key.append((len(rows), int(rows[0]) if len(rows) else -1))
            for s in np.unique(reader.shard[rows]):
                if not self.seq or self.seq[-1] != int(s):
                    self.seq.append(int(s))
                    owner.append(b)
        self.batch_start = np.searchsorted(np.asarray(owner, np.int64),
                                           np.arange(len(batches) + 1)).tolist()
        self.cursor = 0
        self._submitted: set[int] = set()  # queued or in flight
        self.fetched = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._slots = threading.Semaphore(max(1, int(threads)))
        self._pool = ThreadPoolExecutor(max(1, int(threads)), thread_name_prefix="midas-fetch")
        self._thread = threading.Thread(target=self._walk, daemon=True, name="midas-prefetch")
        self._thread.start()

    def reading(self, rows: np.ndarray) -> bool:
        """The reader starts a batch: move the window to it (unplanned reads are ignored).
        True when it is the last planned batch."""
        key = (len(rows), int(rows[0]) if len(rows) else -1)
        with self._cond:
            for b in range(self.cursor, min(self.cursor + MATCH_WINDOW, len(self.batch_key))):
                if self.batch_key[b] == key:
                    self.cursor = b
                    self._cond.notify_all()
                    return b == len(self.batch_key) - 1
        return False

    def _walk(self) -> None:
        for i, shard in enumerate(self.seq):
            with self._cond:
                while not self._stopped and i >= self.batch_start[self.cursor + 1] + self.depth:
                    self._cond.wait(0.5)
                if self._stopped:
                    return
            if (shard in self._submitted
                    or self.reader.remote.cache.contains(self.reader._shard_sha[shard])
                    or self.reader.recently_failed(shard)):
                continue
            self._submitted.add(shard)
            self._slots.acquire()
            if self._stopped:
                self._slots.release()
                return
            try:
                self._pool.submit(self._fetch, shard)
            except RuntimeError:  # pool shut down
                self._slots.release()
                return

    def _fetch(self, shard: int) -> None:
        try:
            if self.reader.ensure_cached(shard):
                self.fetched += 1
        except FetchError as e:
            self.reader._failed[shard] = (time.monotonic(), e)
        except Exception:  # noqa: BLE001 - the reader's own read reports it
            pass
        finally:
            self._submitted.discard(shard)  # evicted later, a later read may need it again
            self._slots.release()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
