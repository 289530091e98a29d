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


class _Race:
    """Ends a stress run only once it has really raced.

    On a slow machine the workers (pushers) could finish before a racing thread ran once, and the test
    would check nothing concurrent. So each worker loops while ``keep_going(i)``: at least ``min_iters``
    rounds, then on until every goal (``name=minimum``) that the racers ``count`` toward is met, or
    ``max_iters`` rounds (the test's own assertion on the goals then fails). A racer wrapped by ``racer``
    that stops (on an error, which _run_threads reports) releases the workers too. ``done`` is set once
    every worker has called ``finish`` (from a ``finally``), which ends the racers' loops.
    """

    def __init__(self, workers, min_iters, max_iters=None, **goals):
        self.done = threading.Event()
        self.counts = dict.fromkeys(goals, 0)
        self.worker_rounds = 0
        self._goals = goals
        self._min_iters, self._max_iters = min_iters, max_iters or 50 * min_iters
        self._workers_left = workers
        self._released = threading.Event()
        self._lock = threading.Lock()
        if not goals:
            self._released.set()

    def keep_going(self, i):
        return i < self._min_iters or (i < self._max_iters and not self._released.is_set())

    def count(self, name, n=1):
        with self._lock:
            self.counts[name] += n
            if all(self.counts[k] >= v for k, v in self._goals.items()):
                self._released.set()

    def racer(self, fn):
        def run():
            try:
                fn()
            finally:
                self._released.set()
        return run

    def finish(self, rounds):
        with self._lock:
            self.worker_rounds += rounds
            self._workers_left -= 1
            if self._workers_left == 0:
                self.done.set()


def _check_rows_whole(rows):
    seen = rows[rows[:, 0] > 0]
    np.testing.assert_array_equal(seen[:, 0], seen[:, 2])        # show == lr_w
    np.testing.assert_array_equal(seen[:, 3:], np.repeat(seen[:, 3:4], DIM, axis=1))  # mf all equal


def test_concurrent_push_pull_lifecycle_export_invariants():
    t = _counting_table()
    pushers = 3
    race = _Race(pushers, min_iters=12, pulls=2, exports=2)
    done = race.done

    def pusher(seed):
        def run():
            i = 0
            try:
                rng = np.random.default_rng(seed)
                grads = np.full((BATCH, 1 + DIM), -1.0, np.float32)
                shows = np.ones(BATCH, np.float32)
                clicks = np.zeros(BATCH, np.float32)
                while race.keep_going(i):
                    keys = rng.integers(-KEY_SPACE // 2, KEY_SPACE // 2, size=BATCH).astype(np.int64)
                    assert t.push(keys, grads, shows, clicks) == 0
                    i += 1
            finally:
                race.finish(i)
        return run

    def puller():
        rng = np.random.default_rng(99)
        while not done.is_set():
            keys = rng.integers(-KEY_SPACE // 2, KEY_SPACE // 2, size=6000).astype(np.int64)
            _check_rows_whole(t.pull(keys, with_stats=True))
            race.count("pulls")

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
            race.count("exports")

    _run_threads([pusher(s) for s in range(pushers)] + [race.racer(puller), lifecycle, race.racer(exporter)])

    e = t.export("checkpoint")
    assert float(e["base"][:, 0].astype(np.float64).sum()) == race.worker_rounds * BATCH
    s = t.stats()
    assert s["inserts"] == len(e["keys"]) == s["keys"] == s["keys_with_mf"]
    assert s["deleted"] == 0
    _check_rows_whole(t.pull(e["keys"], with_stats=True))
    # the race really happened: both readers finished calls while the pushers ran
    assert race.counts["pulls"] >= 2 and race.counts["exports"] >= 2, race.counts


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
    race = _Race(pushers, min_iters=10, deleted=1)

    def pusher(seed):
        def run():
            i = 0
            try:
                rng = np.random.default_rng(seed)
                g = np.full((BATCH, 1 + DIM), -1.0, np.float32)
                while race.keep_going(i):
                    # a window sliding over the key space: each round brings new rows with few shows,
                    # which a shrink deletes, however late the shrinker first gets a CPU
                    keys = rng.integers(0, 8000, size=BATCH).astype(np.int64) + 4000 * i
                    t.push(keys, g, np.ones(BATCH, np.float32), np.zeros(BATCH, np.float32))
                    i += 1
            finally:
                race.finish(i)
        return run

    def shrinker():
        while not race.done.is_set():
            race.count("deleted", t.shrink())

    _run_threads([pusher(s) for s in range(pushers)] + [race.racer(shrinker)])
    # The race really happened: shrinks ran while the pushers did, and some of them deleted rows.
    assert race.counts["deleted"] > 0
    s = t.stats()
    e = t.export("checkpoint")
    assert s["keys"] == len(e["keys"]) == len(t)
    assert s["inserts"] == s["deleted"] + s["keys"]
    assert len(e["tombstones"]) == s["deleted"]
    assert s["deleted"] == race.counts["deleted"]  # shrink is the only thing deleting here
    _check_rows_whole(t.pull(e["keys"], with_stats=True))
