"""Python threads hammering one _C.Table at once (pull, push, shrink, new_day, end_day, export, stats).

Properties (SGD with lr 1 and every gradient component -1, one show per key occurrence, decay 1.0,
delete threshold 0, so nothing is deleted and every value is a small exact integer):
  (1) no torn row: a pull racing a push sees show == lr_w and all mf components equal;
  (2) nothing lost: the total show over rows == the total shows pushed, and push counts match;
  (3) export is one moment: each push call adds exactly BATCH to the total show, so every export's
      total show is a multiple of BATCH.
The GIL is released inside every call, so these threads really run the C++ concurrently.
"""

from __future__ import annotations

import threading

import numpy as np

from torch_psembed import _C
from torch_psembed.config import SGD, CtrAccessorConfig, TableConfig

DIM = 4
BATCH = 5000  # above the C++ parallel threshold, so shard tasks also run on the table's pool
KEY_SPACE = 20000


def _counting_table(num_threads=2, **acc):
    sgd = SGD(learning_rate=1.0, initial_range=0.0, weight_bounds=(-1e9, 1e9))
    fields = dict(embedx_threshold=0.0, show_click_decay_rate=1.0, delete_threshold=0.0,
                  delete_after_unseen_days=10**6)
    fields.update(acc)
    accessor = CtrAccessorConfig(**fields)
    cfg = TableConfig(dim=DIM, accessor=accessor, lr_optimizer=sgd, mf_optimizer=sgd, num_shards=16,
                      num_threads=num_threads)
    return _C.Table(cfg.to_dict())


def _run_threads(targets):
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn)) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
        assert not t.is_alive(), "a stress thread hung"
    if errors:
        raise errors[0]


class _Countdown:
    """Sets ``done`` once ``n`` workers have called ``finish`` (from a ``finally``: a worker that raises
    still ends the loops of the others, so _run_threads reports its error rather than a hang)."""

    def __init__(self, n):
        self.done = threading.Event()
        self._left = n
        self._lock = threading.Lock()

    def finish(self):
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self.done.set()


def _check_rows_whole(rows):
    seen = rows[rows[:, 0] > 0]
    np.testing.assert_array_equal(seen[:, 0], seen[:, 2])        # show == lr_w
    np.testing.assert_array_equal(seen[:, 3:], np.repeat(seen[:, 3:4], DIM, axis=1))  # mf all equal


def test_concurrent_push_pull_lifecycle_export_invariants():
    t = _counting_table()
    pushers, iters = 3, 12
    countdown = _Countdown(pushers)
    done = countdown.done
    counts = {"pulls": 0, "exports": 0}

    def pusher(seed):
        def run():
            try:
                rng = np.random.default_rng(seed)
                grads = np.full((BATCH, 1 + DIM), -1.0, np.float32)
                shows = np.ones(BATCH, np.float32)
                clicks = np.zeros(BATCH, np.float32)
                for _ in range(iters):
                    keys = rng.integers(-KEY_SPACE // 2, KEY_SPACE // 2, size=BATCH).astype(np.int64)
                    assert t.push(keys, grads, shows, clicks) == 0
            finally:
                countdown.finish()
        return run

    def puller():
        rng = np.random.default_rng(99)
        while not done.is_set():
            keys = rng.integers(-KEY_SPACE // 2, KEY_SPACE // 2, size=6000).astype(np.int64)
            _check_rows_whole(t.pull(keys, with_stats=True))
            counts["pulls"] += 1

    def lifecycle():
        day = 0
        while not done.is_set():
            assert t.shrink() == 0
            t.new_day()
            day += 1
            assert t.end_day(day) == 0
            t.stats()
            len(t)

    def exporter():
        while not done.is_set():
            e = t.export("checkpoint")
            base = e["base"]
            total = float(base[:, 0].astype(np.float64).sum())
            assert total % BATCH == 0, f"export saw a partial push: total show {total}"
            np.testing.assert_array_equal(base[:, 0], base[:, 5])
            assert len(e["mf"]) == int(e["has_mf"].sum())
            counts["exports"] += 1

    _run_threads([pusher(s) for s in range(pushers)] + [puller, lifecycle, exporter])

    e = t.export("checkpoint")
    assert float(e["base"][:, 0].astype(np.float64).sum()) == pushers * iters * BATCH
    s = t.stats()
    assert s["inserts"] == len(e["keys"]) == s["keys"] == s["keys_with_mf"]
    assert s["deleted"] == 0
    _check_rows_whole(t.pull(e["keys"], with_stats=True))
    assert counts["pulls"] > 0 and counts["exports"] > 0


def test_concurrent_pushes_equal_sequential_sum():
    """Many threads pushing disjoint-in-time batches give the same totals as one thread."""
    rng = np.random.default_rng(5)
    batches = [rng.integers(0, 3000, size=BATCH).astype(np.int64) for _ in range(8)]
    grads = np.full((BATCH, 1 + DIM), -1.0, np.float32)
    ones = np.ones(BATCH, np.float32)
    zeros = np.zeros(BATCH, np.float32)
    seq = _counting_table(num_threads=1)
    for b in batches:
        seq.push(b, grads, ones, zeros)
    par = _counting_table(num_threads=2)
    _run_threads([lambda b=b: par.push(b, grads, ones, zeros) for b in batches])
    es, ep = seq.export("checkpoint"), par.export("checkpoint")
    np.testing.assert_array_equal(es["keys"], ep["keys"])
    # show, click, lr_w are sums of small integers: exact in any order. delta_score sums 0.1-multiples,
    # whose float32 rounding depends on the order the batches landed in.
    np.testing.assert_array_equal(es["base"][:, [0, 1, 5]], ep["base"][:, [0, 1, 5]])
    np.testing.assert_allclose(es["base"][:, 2], ep["base"][:, 2], rtol=1e-5)


def test_concurrent_shrink_with_deletes_keeps_books_balanced():
    t = _counting_table(delete_threshold=0.5)  # S = 0.1 * show: rows with show < 5 are deleted
    pushers = 2
    countdown = _Countdown(pushers)
    deleted_by_racing_shrinks = []

    def pusher(seed):
        def run():
            try:
                rng = np.random.default_rng(seed)
                g = np.full((BATCH, 1 + DIM), -1.0, np.float32)
                for _ in range(10):
                    keys = rng.integers(0, 8000, size=BATCH).astype(np.int64)
                    t.push(keys, g, np.ones(BATCH, np.float32), np.zeros(BATCH, np.float32))
            finally:
                countdown.finish()
        return run

    def shrinker():
        while not countdown.done.is_set():
            deleted_by_racing_shrinks.append(t.shrink())

    _run_threads([pusher(s) for s in range(pushers)] + [shrinker])
    # The race really happened: shrinks ran while the pushers did, and some of them deleted rows.
    assert sum(deleted_by_racing_shrinks) > 0
    s = t.stats()
    e = t.export("checkpoint")
    assert s["keys"] == len(e["keys"]) == len(t)
    assert s["inserts"] == s["deleted"] + s["keys"]
    assert len(e["tombstones"]) == s["deleted"]
    _check_rows_whole(t.pull(e["keys"], with_stats=True))
