"""The trainer side of a sharded table: dedup, route, fan out, reassemble, bounded asynchronous pushes.

:class:`ShardedTable` is the backend ``SparseTable`` forwards to when ``pse.init()`` started several ranks. It
offers the ``_C.Table`` data-path methods (numpy in, numpy out) plus the collective hook used by checkpoint
code (``is_sharded``, ``num_servers``, ``trainer_rank``, ``num_trainers``, ``collective``).

Routing: ``_C.route(keys, num_servers)`` (a mixing hash of the key, modulo the number of servers) picks the
server of each key; the server's table splits its part further into its internal shards.

Staleness: pushes issued after the latest pull form one *step*. Before a pull, the client waits until at most
``max_staleness`` steps of pushes are still unacknowledged, so with ``max_staleness=k`` the pull of step ``t``
sees every push of step ``t-k-1`` and earlier. ``max_staleness=0`` also waits for the previous push before
issuing the next one, so every push is applied, in order, before anything else (deterministic mode).
A step with no push (pulls in a row) counts as a step too. At most ``max_inflight``
push requests are outstanding; a push that would pass it waits for the oldest until all of its requests fit,
before sending any.

Prefetch: ``prefetch(keys)`` hands the next pull's whole path (dedup, the wait for the pushes its rows must
see, the requests, the assembly in input order) to one background thread per table, so that it overlaps the
training thread's compute; the next ``pull(keys)`` only waits for what is left of it.

Thread safety: one ShardedTable is driven by one training thread. The prefetch thread reads no state the
training thread writes: it gets its keys and the push handles to wait for as arguments, and hands its plan
back through its future.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import pickle
import queue
import threading
import time
import weakref
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import _C
from . import server
from .transport import Handle, Transport, first_error, wait_all

__all__ = ["ShardedTable"]

# Time the training thread spends in each part of the data path (seconds, summed). "prefetch_wait" is the time
# a pull waits for its prefetch thread; the prefetch thread's own work is counted apart, in the "prefetch_*"
# keys of _PREFETCH_TIMERS, since it overlaps the training thread.
_TIMER_NAMES = ("dedup", "rpc_wait", "assembly", "local_pull", "push", "staleness_wait", "prefetch_wait")
_PULL_TIMERS = ("dedup", "staleness_wait", "rpc_wait", "assembly", "local_pull")
_PREFETCH_TIMERS = tuple("prefetch_" + k for k in _PULL_TIMERS)


class ShardedTable:
    """A table whose rows live on ``transport.num_servers`` servers.

    Args:
        name (str): the table's name (the same on every rank).
        config (TableConfig): the table's config; sent to every server, which creates or checks its part.
        transport (Transport): how to reach the servers.
        max_staleness (int): steps of pushes a pull may run ahead of (see module docstring).
        trainer_rank (int), num_trainers (int): this trainer's index and the number of trainers.
        check_alive (callable): raises NotInitializedError once the runtime is shut down.
    """

    is_sharded = True

    def __init__(
        self,
        name: str,
        config,
        transport: Transport,
        max_staleness: int,
        trainer_rank: int,
        num_trainers: int,
        check_alive: Callable[[], None],
        max_inflight: Optional[int] = None,
    ) -> None:
        self.name = name
        self.config = config
        self.dim = config.dim
        self._transport = transport
        self.num_servers = transport.num_servers
        self.max_staleness = int(max_staleness)
        self.trainer_rank = trainer_rank
        self.num_trainers = num_trainers
        self._check_alive = check_alive
        self._nan_raise = config.nan_policy == "raise"
        # Each entry: the handles of one step's pushes. Written only by the training thread.
        self._steps: Deque[List[Handle]] = collections.deque()
        self._step_open = False
        self._pulled = False  # a pull was made: the next one ends a step, with or without pushes
        self._inflight = 0
        self.max_inflight = max_inflight or max(4, 2 * (self.max_staleness + 1)) * self.num_servers
        self.timers: Dict[str, float] = dict.fromkeys(_TIMER_NAMES + _PREFETCH_TIMERS, 0.0)
        self._plan_cache = collections.deque(maxlen=2)  # (keys, plan) of the last two plans, see _plan
        self._prefetched = None  # (keys, with_stats, future of _prefetch_job) until the pull takes it
        self._prefetcher: Optional[_Worker] = None  # made by the first prefetch
        # Pushes with keys issued so far; (trainer_rank << 32) | count names a push for the servers'
        # admission draws, as a local table's own count does (so 1 trainer matches a local table).
        self._push_count = 0
        cfg = config.to_dict()
        if config.max_keys is not None:  # a bound on the whole table: each server holds its share of the keys
            cfg["max_keys"] = config.max_keys // self.num_servers
            if cfg["max_keys"] < config.num_shards:
                raise ValueError(f"TableConfig.max_keys={config.max_keys} leaves each of the {self.num_servers} "
                                 f"servers {cfg['max_keys']} rows, fewer than its {config.num_shards} shards")
        wait_all([transport.create_table(s, name, cfg) for s in range(self.num_servers)])

    # -- helpers ------------------------------------------------------------------------------------------
    def _split(self, keys: np.ndarray) -> List[Tuple[int, np.ndarray]]:
        """``(server, positions into keys)`` for each server owning some of ``keys`` (keys already unique)."""
        if self.num_servers == 1:
            return [(0, None)]
        # a counting sort in C++: O(n), where a stable argsort of the owners is O(n log n)
        order, starts = _C.group_by_owner(keys, self.num_servers)
        ends = np.append(starts[1:], keys.shape[0])
        return [(s, order[starts[s] : ends[s]]) for s in range(self.num_servers) if ends[s] > starts[s]]

    def _plan(self, keys: np.ndarray):
        """``(unique keys, inverse index, parts, identity)`` of ``keys``.

        ``_C.dedup_by_owner`` groups the distinct keys by server, so each part ``(server, start, end)`` is
        the slice ``unique[start:end]``: requests need no gather and replies no scatter. ``identity`` is
        True when ``unique`` is ``keys`` itself (distinct keys, one server), so no inverse gather is needed.
        A push usually carries the keys of a recent pull, so the last two plans are kept with a copy of their
        keys and reused when the new keys are equal (a 0.1 ms comparison instead of a new dedup). Two, since a
        prefetch of the next step's keys may come between a pull and its push.
        """
        for cached in self._plan_cache:
            c = cached[0]
            # the first and last keys settle most mismatches before the full comparison
            if c.shape == keys.shape and (c.size == 0 or (c[0] == keys[0] and c[-1] == keys[-1])) \
                    and np.array_equal(c, keys):
                return cached[1]
        plan = self._new_plan(keys)
        self._plan_cache.append((keys.copy(), plan))
        return plan

    def _new_plan(self, keys: np.ndarray):
        """The plan of ``_plan``, always computed afresh and not cached (the prefetch thread's entry)."""
        # one C++ pass, GIL released: a hash dedup (~2.5x faster than torch.unique at 106k ids) and a
        # counting sort of the distinct keys by owner
        uniq, inverse, starts = _C.dedup_by_owner(np.ascontiguousarray(keys, dtype=np.int64), self.num_servers)
        bounds = starts.tolist()
        parts = [(s, bounds[s], bounds[s + 1]) for s in range(self.num_servers) if bounds[s + 1] > bounds[s]]
        identity = self.num_servers == 1 and uniq.shape[0] == keys.shape[0]
        return uniq, inverse, parts, identity

    def _wait_steps(self, keep: int) -> None:
        """Wait until at most ``keep`` steps of pushes are unacknowledged."""
        try:
            while len(self._steps) > keep:
                step = self._steps.popleft()
                self._inflight -= len(step)
                wait_all(step)  # every request of the step, then its first error
        finally:
            # Also when a push failed (a server's MemoryError, which the job may survive): the step is gone
            # from _steps either way, and a push must not find the open step missing.
            if not self._steps:  # the open step (if any) was drained too: the next push opens a new one
                self._step_open = False

    def _wait_oldest_push(self) -> None:
        while len(self._steps) > 1 and not self._steps[0]:
            self._steps.popleft()
        step = self._steps[0]
        if not step:
            return
        h = step.pop(0)
        self._inflight -= 1
        if not step and len(self._steps) > 1:  # the open (last) step stays, even empty
            self._steps.popleft()
        h.wait()

    # -- data path ----------------------------------------------------------------------------------------
    def pull(self, keys: np.ndarray, with_stats: bool = False) -> np.ndarray:
        self._check_alive()
        pending = self._take_prefetch(keys, with_stats)
        plan = None
        if pending is None and keys.shape[0] > 0:
            plan = self._timed_plan(keys)  # before the wait: it overlaps the servers' work on those pushes
        t0 = time.perf_counter()
        if self._pulled and not self._step_open:
            # The step since the last pull pushed nothing (an evaluation batch, an accumulation step): it
            # still counts, so the pull of step t sees the pushes of step t-k-1 as documented.
            self._steps.append([])
        self._pulled = True
        # With a prefetch this only books the steps its thread waited for (and raises a failed push's error
        # here, as a plain pull does).
        self._wait_steps(self.max_staleness)
        self._step_open = False
        self.timers["staleness_wait"] += time.perf_counter() - t0
        if pending is not None:
            return self._finish_prefetch(pending)
        if keys.shape[0] == 0:
            return np.zeros((0, 1 + self.dim + (2 if with_stats else 0)), np.float32)
        return self._finish_pull(self._start_pull(plan, keys.shape[0], with_stats))

    def prefetch(self, keys: np.ndarray, with_stats: bool = False) -> None:
        """Start the pull that the next ``pull(keys, with_stats)`` returns, so that it overlaps the caller's
        compute (call it with the next batch's ids; see below for where).

        The pull runs on a background thread: its dedup, its wait for the pushes its rows must see, its
        requests and the assembly of its rows; the next ``pull(keys)`` waits only for what is left. The rows
        obey the bound of that pull: with ``max_staleness=k`` the pull of step ``t`` sees every push of step
        ``t-k-1`` and earlier, so a prefetch during step ``t-1`` (before or after its push) may leave the pushes
        of step ``t-1`` and of the ``k-1`` steps before unapplied, and waits for the older ones. With ``k=0``
        the next pull must see this step's pushes: nothing can start early, and this is a no-op. A pull of
        other keys drops the prefetched rows (and pulls afresh), and so do ``flush`` and every table-wide
        operation. An error of the prefetch (a dead peer) is raised by the pull that takes it.
        """
        self._check_alive()
        self._drop_prefetch()
        if self.max_staleness == 0 or keys.shape[0] == 0:
            return
        keys = np.array(keys, dtype=np.int64, order="C", copy=True)  # the caller may reuse its array
        # The pushes this pull must see: every step but the newest k (k-1 while no push of this step is
        # issued yet, since the step the pull belongs to has not begun). Their handles are copied here, on
        # the training thread, which alone writes _steps.
        keep = self.max_staleness if self._step_open else self.max_staleness - 1
        steps = list(self._steps)
        must_see = [h for step in steps[: max(0, len(steps) - keep)] for h in step]
        if self._prefetcher is None:
            self._prefetcher = _Worker(f"psembed-prefetch-{self.name}")
            weakref.finalize(self, self._prefetcher.stop)  # the thread ends with its table
        job = self._prefetcher.submit(self._prefetch_job, keys, bool(with_stats), must_see)
        self._prefetched = (keys, bool(with_stats), job)

    def _prefetch_job(self, keys: np.ndarray, with_stats: bool, must_see: List[Handle]):
        """The prefetch thread's work: ``(plan, rows in input order, its timers)``."""
        timers = dict.fromkeys(_PULL_TIMERS, 0.0)
        t0 = time.perf_counter()
        plan = self._new_plan(keys)
        t1 = time.perf_counter()
        for h in must_see:  # handles are safe to wait from two threads (the training thread waits them again)
            h.wait()
        t2 = time.perf_counter()
        timers["dedup"] = t1 - t0
        timers["staleness_wait"] = t2 - t1
        rows = self._finish_pull(self._start_pull(plan, keys.shape[0], with_stats, timers), timers)
        return plan, rows, timers

    def _take_prefetch(self, keys: np.ndarray, with_stats: bool):
        """The prefetch of exactly these keys, or None (dropping a prefetch of other keys)."""
        p = self._prefetched
        if p is None:
            return None
        if p[1] == bool(with_stats) and p[0].shape == keys.shape and np.array_equal(p[0], keys):
            self._prefetched = None
            return p
        self._drop_prefetch()
        return None

    def _finish_prefetch(self, prefetched) -> np.ndarray:
        """Wait for a prefetch taken by ``pull``: its rows; its plan is cached for the push of the same keys."""
        t0 = time.perf_counter()
        try:
            plan, rows, timers = prefetched[2].result()
        finally:
            self.timers["prefetch_wait"] += time.perf_counter() - t0
        for k, v in timers.items():
            self.timers["prefetch_" + k] += v
        self._plan_cache.append((prefetched[0], plan))
        return rows

    def _drop_prefetch(self) -> None:
        p, self._prefetched = self._prefetched, None
        if p is None:
            return
        # Its rows are not wanted; an error (a dead peer) is raised again by the next call that needs it.
        with contextlib.suppress(Exception):
            p[2].result()

    def _timed_plan(self, keys: np.ndarray):
        t = time.perf_counter()
        plan = self._plan(keys)
        self.timers["dedup"] += time.perf_counter() - t
        return plan

    def _start_pull(self, plan, n: int, with_stats: bool, timers: Optional[Dict[str, float]] = None):
        """One pull per owner of a plan (``_plan``) of n keys: remote ones in flight, this rank's own shard
        served at once. Times go to ``timers`` (default: the training thread's ``self.timers``)."""
        uniq, inverse, parts, identity = plan
        t2 = time.perf_counter()
        width = 1 + self.dim + (2 if with_stats else 0)
        u = uniq.shape[0]
        whole = len(parts) == 1  # one owner: its reply is the rows array itself
        rows = None if whole else np.empty((u, width), np.float32)
        handles = []
        local = None
        for s, a, b in parts:
            if s == self._transport.local_server:
                local = (s, a, b)  # served after the remote pulls are on their way
                continue
            # in flight after we return: an array of its own where the transport needs one
            part = _slice(uniq, a, b, copy=self._transport.copy_slices and (b - a) < u)
            handles.append((a, b, self._transport.pull(s, self.name, part, with_stats)))
        t_local = 0.0
        if local is not None:
            s, a, b = local
            tl = time.perf_counter()
            try:
                r = self._transport.pull(s, self.name, uniq[a:b], with_stats).wait()
            except Exception as e:  # noqa: BLE001 - raised once the remote parts in flight have ended
                try:
                    wait_all([h for _, _, h in handles])
                except Exception as e2:  # noqa: BLE001
                    raise first_error([e, e2]) from None
                raise
            t_local = time.perf_counter() - tl
            if whole:
                rows = r
            else:
                rows[a:b] = r
        tm = self.timers if timers is None else timers
        tm["local_pull"] += t_local
        tm["assembly"] += time.perf_counter() - t2 - t_local
        return {"n": n, "width": width, "inverse": None if identity else inverse, "rows": rows,
                "whole": whole, "handles": handles}

    def _finish_pull(self, p: Dict[str, Any], timers: Optional[Dict[str, float]] = None) -> np.ndarray:
        """Wait for the remote parts of a started pull and assemble the rows in input order."""
        t2 = time.perf_counter()
        results = wait_all([h for _, _, h in p["handles"]])  # raises only after every part ended
        wait_time = time.perf_counter() - t2
        rows = p["rows"]
        for (a, b, _), r in zip(p["handles"], results):
            if p["whole"]:
                rows = r
            else:
                rows[a:b] = r
        if p["inverse"] is None:  # distinct keys, one server: the rows are in input order already
            out = rows
        else:
            out = np.take(rows, p["inverse"], axis=0)  # np.take is ~3x faster than rows[inverse] for 2-D rows
        tm = self.timers if timers is None else timers
        tm["rpc_wait"] += wait_time
        tm["assembly"] += time.perf_counter() - t2 - wait_time
        return out

    def _check_push(self, keys, grads, shows, clicks, slots) -> None:
        n = keys.shape[0]
        if grads.ndim != 2 or grads.shape[0] != n or grads.shape[1] != 1 + self.dim:
            raise ValueError(f"grads must have shape ({n}, {1 + self.dim}), got {tuple(grads.shape)}")
        for name, a in (("shows", shows), ("clicks", clicks)):
            if a.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},), got {tuple(a.shape)}")
            if not np.isfinite(a).all():
                raise ValueError(f"{name} must be finite (no NaN/Inf)")
            if (a < 0).any():
                raise ValueError(f"{name} must be >= 0, got a negative value")
        if slots is not None:
            if slots.shape != (n,):
                raise ValueError(f"slots must have shape ({n},), got {tuple(slots.shape)}")
            # Checked here, before any server gets its part: a server refusing its part would leave the
            # others' applied (the servers check it too, as a local table does).
            bad = np.flatnonzero((slots < 0) | (slots >= _C.SLOT_LIMIT))
            if bad.size:
                i = int(bad[0])
                raise ValueError(f"slots must be in [0, {_C.SLOT_LIMIT}) (a checkpoint stores them as float32, "
                                 f"exact up to 2^24), got slots[{i}] = {int(slots[i])}")

    def push(self, keys, grads, shows, clicks, slots=None) -> int:
        self._check_alive()
        t0 = time.perf_counter()
        self._check_push(keys, grads, shows, clicks, slots)
        n = keys.shape[0]
        bad_rows = _C.nonfinite_rows(grads)  # one C++ pass (numpy's isfinite().all(axis=1): ~2.5 ms per 106k rows)
        skipped = int(bad_rows.shape[0])
        if skipped and self._nan_raise:
            raise ValueError(f"grads has a NaN/Inf value in row {int(bad_rows[0])} (nan_policy='raise')")
        if n == 0:
            return 0
        push_id = (self.trainer_rank << 32) | (self._push_count & 0xFFFFFFFF)
        self._push_count += 1
        if self.max_staleness == 0:
            self._wait_steps(0)
        if not self._step_open:
            self._steps.append([])
            self._step_open = True
        # Room for every request of this push before the first is sent (at most one per server, and one more
        # per server for skipped rows): waiting for an older push between two of them would raise that push's
        # error with this one half sent, its first servers' parts applied and the rest never sent.
        parts = self.num_servers * (2 if skipped else 1)
        while self._inflight > 0 and self._inflight + parts > self.max_inflight:
            self._wait_oldest_push()
        if skipped:
            # nan_policy="skip": the table skips (and counts) each bad input row; merging one into a good
            # row would poison the sum, so the bad rows travel unmerged to their owners.
            for s, pos in self._split(keys[bad_rows]):
                idx = bad_rows if pos is None else bad_rows[pos]
                self._send(s, keys[idx], grads[idx], shows[idx], clicks[idx], None if slots is None else slots[idx],
                           push_id)
            good = np.ones(n, bool)
            good[bad_rows] = False
            keys, grads, shows, clicks = keys[good], grads[good], shows[good], clicks[good]
            slots = None if slots is None else slots[good]
            n = keys.shape[0]
        if n:
            self._push_merged(keys, grads, shows, clicks, slots, push_id)
        if self.max_staleness == 0:
            self._wait_steps(0)
        self.timers["push"] += time.perf_counter() - t0
        return skipped

    def _push_merged(self, keys, grads, shows, clicks, slots, push_id) -> None:
        """Merge duplicates exactly as ``_C.Table.push`` does (float32 sums in input order, last slot) and send."""
        n = keys.shape[0]
        uniq, inverse, parts, identity = self._plan(keys)
        u = uniq.shape[0]
        if identity:  # distinct keys, one server: the caller's arrays are the merged push
            g, s_m, c_m, sl_m = grads, shows, clicks, slots
        else:
            # float32 sums in input order, one C++ call (torch's index_add_ loops per index: ~10x slower);
            # with distinct keys this is the permutation into the owners' order
            g, s_m, c_m = _C.merge_push(inverse, u, grads, shows, clicks)
            sl_m = None
            if slots is not None:  # the slot of the last occurrence
                last = torch.full((u,), -1, dtype=torch.int64)
                last.scatter_reduce_(0, torch.from_numpy(inverse), torch.arange(n), reduce="amax")
                sl_m = slots[last.numpy()]
        for s, a, b in parts:
            # the local server is served before _send returns, so views will do; a remote push is in
            # flight after we return: where the transport needs it (copy_slices), it gets arrays of its
            # own, unless it takes all of the merged ones
            own = (self._transport.copy_slices and s != self._transport.local_server and (identity or b - a < u))
            arrays = [None if x is None else _slice(x, a, b, own) for x in (uniq, g, s_m, c_m, sl_m)]
            self._send(s, *arrays, push_id)

    def _send(self, s, keys, grads, shows, clicks, slots, push_id) -> None:
        # (no wait here: push made room for all of its requests before sending the first)
        self._steps[-1].append(self._transport.push(s, self.name, keys, grads, shows, clicks, slots, push_id))
        self._inflight += 1

    def flush(self) -> None:
        """Wait until every push issued by this trainer has been applied (and drop a prefetched pull)."""
        self._drop_prefetch()
        self._wait_steps(0)

    # -- table-wide ---------------------------------------------------------------------------------------
    def collective(self, fn: Callable, *args: Any) -> List[Any]:
        """Run ``fn(local_c_table, server_index, num_servers, *args)`` once on every server; collective.

        Every trainer must call it. Barrier over trainers, flush of every trainer's pushes, the first
        trainer runs ``fn`` on every server, then every trainer returns the same list (server order). An
        error raised by ``fn`` is raised on every trainer.
        """
        self._check_alive()
        self.flush()
        self._transport.trainer_barrier()
        self._check_same_collective(fn, args)
        payload = None
        if self.trainer_rank == 0:
            try:
                payload = ("ok", self._transport.call_all(self.name, fn, args))
            except Exception as e:  # noqa: BLE001 - sent to every trainer
                if _is_peer_error(e):
                    # tell the other trainers at once (they would otherwise wait for the broadcast to time out)
                    with contextlib.suppress(Exception):
                        self._transport.broadcast_from_first_trainer(("peer", (e.rank, str(e))))
                    raise
                payload = ("error", _picklable(e))
        payload = self._transport.broadcast_from_first_trainer(payload)
        if payload is not None and payload[0] == "peer":
            # The first trainer raised right after sending it, without the second barrier: waiting there
            # would hold this trainer until the first one's process ends (or the barrier times out).
            from ..errors import PeerUnavailableError
            from .runtime import _failure

            rank, message = payload[1]
            raise _failure(rank, "collective", PeerUnavailableError(message, rank=rank))
        self._transport.trainer_barrier()
        if payload is None:
            raise RuntimeError(f"collective on table {self.name!r}: the first trainer sent no result")
        kind, value = payload
        if kind == "error":
            raise value
        return value

    def _check_same_collective(self, fn: Callable, args: Sequence[Any]) -> None:
        """Raise the same error on every trainer unless all called this operation, on this table, with the
        same numeric arguments (a day): the barriers only count calls, so trainers calling different ones (one
        end_day, another shrink, or end_day on another table) went on, and only the first trainer's ran.
        Other arguments (paths) are not compared: trainers may spell one path differently."""
        mine = (f"{fn.__module__}.{fn.__qualname__}", self.name,
                tuple(a for a in args if a is None or isinstance(a, (bool, int, float))))
        every = self._transport.gather_trainers(mine)
        if any(s != every[0] for s in every):
            calls = "; ".join(f"trainer {i}: {s[0].rsplit('.', 1)[-1]}{s[2] if s[2] else '()'} on table {s[1]!r}"
                              for i, s in enumerate(every))
            raise RuntimeError(f"the trainers called different table-wide operations at once ({calls}): every "
                               "trainer must call them in the same order, with the same arguments; none was run")

    def shrink(self) -> int:
        return int(sum(self.collective(server.op_shrink)))

    def new_day(self) -> None:
        self.collective(server.op_new_day)

    def end_day(self, day: int) -> int:
        return int(sum(self.collective(server.op_end_day, int(day))))

    @property
    def day(self) -> int:
        self._check_alive()
        return int(self._transport.call(0, self.name, server.op_get_day).wait())

    def stats(self) -> Dict[str, Any]:
        """Global totals (sum over servers); not collective."""
        self._check_alive()
        total: Dict[str, Any] = {}
        for st in self._transport.call_all(self.name, server.op_stats):
            for k, v in st.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    total[k] = total.get(k, 0) + v
                else:
                    total.setdefault(k, v)
        return total

    def __len__(self) -> int:
        self._check_alive()
        return int(sum(self._transport.call_all(self.name, server.op_len)))

    def __contains__(self, key: int) -> bool:
        self._check_alive()
        key = int(key)
        if key >= 2**63:  # a uint64 feasign: same bits as int64
            key -= 2**64
        owner = int(_C.route(np.array([key], dtype=np.int64), self.num_servers)[0])
        return bool(self._transport.call(owner, self.name, server.op_contains, (int(key),)).wait())

    def reset_timers(self) -> None:
        self.timers = dict.fromkeys(_TIMER_NAMES + _PREFETCH_TIMERS, 0.0)


class _Worker:
    """One daemon thread running the calls submitted to it, in order; ``submit`` returns a Future.

    Not a ``ThreadPoolExecutor``: its threads are joined at interpreter exit, so after a failure a job still
    waiting on an unresponsive peer would hold the process's exit for up to ``rpc_timeout``.
    """

    def __init__(self, name: str) -> None:
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable, *args: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fut, fn, args))
        return fut

    def stop(self) -> None:
        """End the thread once the jobs submitted before are done."""
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - delivered to the caller through the future
                fut.set_exception(e)
            del job, fut, fn, args  # the job's references (its table, among them) must not outlive it


def _slice(x: np.ndarray, a: int, b: int, copy: bool) -> np.ndarray:
    """``x[a:b]``; with ``copy``, an array of its own (see ``Transport.copy_slices``)."""
    return x[a:b].copy() if copy else x[a:b]


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


def _is_peer_error(e: BaseException) -> bool:
    from ..errors import PeerUnavailableError

    return isinstance(e, PeerUnavailableError)
