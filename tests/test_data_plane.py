"""The TCP data plane in one process: ``_C.DataServer`` serving ``_C.Table`` objects to ``_C.DataChannel``s over
127.0.0.1, and ``TcpTransport``'s mapping of its failures (multi-process use: tests/test_distributed.py).

Rows are checked against a second table given the same calls directly, whose rules tests/test_table_numerics.py
checks against the numpy reference; here the question is only whether the wire changes anything.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

import numpy as np
import pytest

import torch_psembed as pse
from torch_psembed import _C
from torch_psembed.distributed.tcp_transport import TcpTransport, data_plane_host
from torch_psembed.errors import PeerUnavailableError

from conftest import REPO, run_python

sys.path.insert(0, os.path.join(REPO, "tests", "fuzz"))
from _wire import REP, REP_MAGIC, REQ, REQ_MAGIC  # noqa: E402  (the protocol's frames, shared with the fuzz target)

TIMEOUT = 20.0


def _config(dim=4, nan_policy="raise"):
    return pse.TableConfig(
        dim=dim,
        accessor=pse.CtrAccessorConfig(embedx_threshold=1.0),
        mf_optimizer=pse.AdaGrad(learning_rate=0.05, initial_range=0.01),
        nan_policy=nan_policy,
        seed=3,
    ).to_dict()


@pytest.fixture
def served():
    """A data server holding table "t"; yields (server, table, channel)."""
    server = _C.DataServer("127.0.0.1", 0)
    table = _C.Table(_config())
    server.register("t", table)
    channel = _C.DataChannel("127.0.0.1", server.port, TIMEOUT, TIMEOUT)
    try:
        yield server, table, channel
    finally:
        channel.close()
        server.stop()


def _push_args(rng, keys, dim):
    n = keys.shape[0]
    grads = rng.normal(size=(n, 1 + dim)).astype(np.float32)
    shows = rng.integers(0, 3, n).astype(np.float32)
    clicks = np.minimum(shows, rng.integers(0, 2, n)).astype(np.float32)
    slots = rng.integers(0, 30, n).astype(np.int32)
    return grads, shows, clicks, slots


def test_rows_over_the_wire_equal_direct_calls(served):
    server, table, channel = served
    direct = _C.Table(_config())
    rng = np.random.default_rng(0)
    universe = rng.integers(-(2**63), 2**63 - 1, size=3000, dtype=np.int64)
    for step in range(30):
        n = int(rng.integers(0, 6000 if step % 5 == 0 else 400))  # some batches reach the table's parallel path
        keys = rng.choice(universe, n)  # with repeats: the server merges them as the table does
        grads, shows, clicks, slots = _push_args(rng, keys, 4)
        push_id = None if step % 3 else step
        # two requests in flight before the first wait, replies matched by id; a pull sent before a push is
        # served before it (a pull sent after an unacknowledged push may or may not see it)
        qid = channel.pull("t", universe[:500], step % 2 == 0)
        pid = channel.push("t", keys, grads, shows, clicks, slots if step % 2 else None, push_id)
        expected = direct.pull(universe[:500], step % 2 == 0)
        got = channel.wait(qid, TIMEOUT)
        assert got.dtype == np.float32 and got.shape == (500, (3 if step % 2 == 0 else 1) + 4)
        np.testing.assert_array_equal(got, expected)
        assert channel.wait(pid, TIMEOUT) == 0
        direct.push(keys, grads, shows, clicks, slots if step % 2 else None, push_id)
    np.testing.assert_array_equal(channel.wait(channel.pull("t", universe, True), TIMEOUT), direct.pull(universe, True))
    assert channel.wait(channel.pull("t", universe[:0]), TIMEOUT).shape == (0, 5)
    assert len(table) == len(direct) and server.errors == 0 and server.requests == 62


def test_refused_requests_raise_the_servers_error_and_change_nothing(served):
    server, table, channel = served
    keys = np.array([1, 2, 3], np.int64)
    g = np.zeros((3, 5), np.float32)
    ones = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"shows must be finite and >= 0, got shows\[1\] = -1"):
        channel.wait(channel.push("t", keys, g, np.array([1, -1, 1], np.float32), ones), TIMEOUT)
    bad = g.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="grads has NaN/Inf in row 2 .*nan_policy='raise'"):
        channel.wait(channel.push("t", keys, bad, ones, ones), TIMEOUT)
    with pytest.raises(ValueError, match="grads must have 5 columns .* got 3"):
        channel.wait(channel.push("t", keys, np.zeros((3, 3), np.float32), ones, ones), TIMEOUT)
    with pytest.raises(ValueError, match="no table named 'nope' on this server"):
        channel.wait(channel.pull("nope", keys), TIMEOUT)
    assert len(table) == 0 and server.errors == 4
    assert channel.wait(channel.push("t", keys, g, ones, ones), TIMEOUT) == 0  # the connection goes on
    assert len(table) == 3


def test_bad_arguments_are_refused_before_sending(served):
    server, _, channel = served
    with pytest.raises(TypeError, match="keys must have dtype int64"):
        channel.pull("t", np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="shows must have length 2"):
        channel.push("t", np.zeros(2, np.int64), np.zeros((2, 5), np.float32), np.ones(3, np.float32),
                     np.ones(2, np.float32))
    with pytest.raises(ValueError, match="push_id must be >= 0"):
        channel.push("t", np.zeros(2, np.int64), np.zeros((2, 5), np.float32), np.ones(2, np.float32),
                     np.ones(2, np.float32), None, -1)
    with pytest.raises(ValueError, match="table name"):
        channel.pull("", np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="timeout"):
        channel.wait(1, 0.0)
    assert server.requests == 0


def test_nan_skip_policy_is_applied_by_the_server():
    server = _C.DataServer("127.0.0.1", 0)
    table = _C.Table(_config(nan_policy="skip"))
    server.register("t", table)
    channel = _C.DataChannel("127.0.0.1", server.port, TIMEOUT, TIMEOUT)
    try:
        g = np.ones((3, 5), np.float32)
        g[1, 0] = np.inf
        ones = np.ones(3, np.float32)
        assert channel.wait(channel.push("t", np.array([7, 8, 9], np.int64), g, ones, ones), TIMEOUT) == 1
        assert len(table) == 2 and table.stats()["rejected"] == 1
    finally:
        channel.close()
        server.stop()


def _raw_frame(sock, payload: bytes):
    sock.sendall(payload)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_unreadable_frames_close_only_their_connection(served):
    server, table, channel = served
    keys = np.arange(5, dtype=np.int64)
    channel.wait(channel.push("t", keys, np.ones((5, 5), np.float32), np.ones(5, np.float32),
                              np.zeros(5, np.float32)), TIMEOUT)
    frames = [
        b"GET / HTTP/1.0\r\n\r\n" + bytes(40),                                 # not our protocol
        REQ.pack(REQ_MAGIC, 9, 0, 1, 0, 0, 1, 0, 0),                      # unknown op
        REQ.pack(REQ_MAGIC, 1, 0, 5000, 0, 0, 1, 0, 0),                   # name too long
        REQ.pack(REQ_MAGIC, 2, 0, 1, 0, 0, 1, 1, 0),                      # push of width 0
        REQ.pack(REQ_MAGIC, 1, 0, 1, 0, 0, 1, 2**40, 0),                  # absurd key count
    ]
    for frame in frames:
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            reply = _raw_frame(sock, frame)  # returns once the server closed the connection
        magic, code, _, _, _, rid, _, size = REP.unpack_from(reply)
        assert (magic, code, rid) == (REP_MAGIC, 3, 0) and len(reply) == 40 + size
    # A frame cut short (the sender died mid-frame) is dropped without an answer.
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(REQ.pack(REQ_MAGIC, 1, 0, 1, 0, 0, 1, 1000, 0) + b"t" + bytes(7) + bytes(80))
    # The existing channel was served throughout.
    np.testing.assert_array_equal(channel.wait(channel.pull("t", keys), TIMEOUT), table.pull(keys, False))
    assert server.errors == len(frames)


def test_a_stopped_server_fails_waiting_and_later_requests(served):
    server, _, channel = served
    rid = channel.pull("t", np.arange(3, dtype=np.int64))
    channel.wait(rid, TIMEOUT)
    server.stop()
    with pytest.raises(ConnectionError):
        channel.wait(channel.pull("t", np.arange(3, dtype=np.int64)), TIMEOUT)
    with pytest.raises(ConnectionError):
        channel.pull("t", np.arange(3, dtype=np.int64))
    server.stop()  # idempotent


def test_a_reply_that_never_comes_times_out_and_fails_every_request_on_the_channel():
    # A listening socket that accepts but never answers: the silent (hung) peer. The first request's timeout
    # fails the channel, so the others fail at once (not one timeout each); waiting for an id never sent is
    # refused.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        channel = _C.DataChannel("127.0.0.1", listener.getsockname()[1], TIMEOUT, TIMEOUT)
        try:
            ids = [channel.pull("t", np.arange(3, dtype=np.int64)) for _ in range(4)]
            with pytest.raises(ValueError, match="not sent or was already waited for"):
                channel.wait(10**6, 0.2)
            with pytest.raises(ConnectionError, match="no reply within"):
                channel.wait(ids[0], 0.2)
            assert all(channel.ready(i) for i in ids[1:])
            for i in ids[1:]:
                with pytest.raises(ConnectionError, match="no reply within"):
                    channel.wait(i, 3600.0)  # returns at once: the channel already failed
            with pytest.raises(ConnectionError):
                channel.pull("t", np.arange(3, dtype=np.int64))
        finally:
            channel.close()


def _fake_server(replies):
    """A listening socket whose one connection answers each request with the next of ``replies``: functions
    (request id, key count) -> bytes. Returns (port, thread)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        with conn, listener:
            for reply in replies:
                header = conn.recv(40, socket.MSG_WAITALL)
                if len(header) < 40:
                    return
                _, _, _, name_len, _, _, rid, n, _ = REQ.unpack(header)
                conn.recv(((name_len + 7) & ~7) + 8 * n, socket.MSG_WAITALL)
                conn.sendall(reply(rid, n))
            conn.recv(1)  # until the channel closes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


@pytest.mark.parametrize("reply, message", [
    # An error message announced at 2**40 bytes (the trainer used to allocate it and abort).
    (lambda rid, n: REP.pack(REP_MAGIC, 1, b"", 0, 0, rid, 0, 1 << 40), "an error reply of 1099511627776 bytes"),
    # Rows within every wire limit but not the request's: 2**28 rows of 1024 floats for a pull of 3 keys.
    (lambda rid, n: REP.pack(REP_MAGIC, 0, b"", 1024, 0, rid, 1 << 28, 1 << 40), "2..435456 rows"),
    # One row for a pull of 3 (was broadcast into all three), and a pull answered like a push.
    (lambda rid, n: REP.pack(REP_MAGIC, 0, b"", 5, 0, rid, 1, 20) + bytes(20), "1 rows of 5 floats"),
    (lambda rid, n: REP.pack(REP_MAGIC, 0, b"", 0, 0, rid, n, 0), "3 rows of 0 floats"),
    # A reply to a request that was never sent.
    (lambda rid, n: REP.pack(REP_MAGIC, 0, b"", 5, 0, rid + 7, n, 20 * n) + bytes(20 * n), "not waiting"),
])
def test_a_reply_that_does_not_match_its_request_fails_the_channel(reply, message):
    port, thread = _fake_server([reply])
    channel = _C.DataChannel("127.0.0.1", port, TIMEOUT, TIMEOUT)
    try:
        with pytest.raises(ConnectionError, match=message):
            channel.wait(channel.pull("t", np.arange(3, dtype=np.int64)), TIMEOUT)
    finally:
        channel.close()
    thread.join(TIMEOUT)


def test_a_server_out_of_memory_answers_memoryerror_and_keeps_serving():
    # A pull whose reply cannot be allocated (4M keys of a dim-4096 table with stats: 67 GB) and a push of
    # new keys beyond an address-space limit: before, std::bad_alloc escaped the connection's thread and the
    # whole server process aborted. Now each request gets MemoryError and the connection goes on.
    out = run_python("""
        import resource
        import numpy as np
        from torch_psembed import _C
        wide = _C.Table({"dim": 4096})
        narrow = _C.Table({"dim": 8})
        server = _C.DataServer("127.0.0.1", 0)
        server.register("wide", wide)
        server.register("narrow", narrow)
        channel = _C.DataChannel("127.0.0.1", server.port, 60.0, 60.0)
        keys = np.arange(4 << 20, dtype=np.int64)
        # The address space bounded before the pull too: a host that overcommits would map the 67 GB.
        vm = int(open("/proc/self/statm").read().split()[0]) * 4096
        resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
        try:
            channel.wait(channel.pull("wide", keys, True), 60.0)
        except MemoryError as e:
            print("pull:", e)
        n = 200_000
        grads, shows, clicks = np.zeros((n, 9), np.float32), np.ones(n, np.float32), np.zeros(n, np.float32)
        for b in range(100):
            keys = np.arange(b * n, (b + 1) * n, dtype=np.int64)
            try:
                channel.wait(channel.push("narrow", keys, grads, shows, clicks), 60.0)
            except MemoryError as e:
                print("push:", e)
                break
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        rows = channel.wait(channel.pull("narrow", np.arange(3, dtype=np.int64)), 60.0)
        print("served after:", rows.shape)
        channel.close()
        server.stop()
    """)
    assert "pull: the data server ran out of memory" in out
    assert "push: the data server ran out of memory" in out
    # (not asserted: whether a push fit under the limit before one ran out; that depends on the host's headroom)
    assert "served after: (3, 9)" in out


def test_the_server_accepts_again_after_running_out_of_descriptors():
    # accept() failing with EMFILE used to end the accept loop for good: later clients connected (the
    # kernel's backlog) and were never served.
    out = run_python("""
        import encodings.idna, os, resource, socket, time
        import numpy as np
        from torch_psembed import _C
        server = _C.DataServer("127.0.0.1", 0)
        server.register("t", _C.Table({"dim": 4}))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        fillers = []
        while True:
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                break
        os.close(fillers.pop())  # room for the client's socket only: the server's accept() gets EMFILE
        client = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        time.sleep(0.3)
        for fd in fillers:
            os.close(fd)
        client.close()
        channel = _C.DataChannel("127.0.0.1", server.port, 20.0, 20.0)
        print("served:", channel.wait(channel.pull("t", np.arange(3, dtype=np.int64)), 20.0).shape)
        channel.close()
        server.stop()
    """)
    assert "served: (3, 5)" in out


def test_no_server_listening_is_a_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(ConnectionError, match="connect to 127.0.0.1"):
            _C.DataChannel("127.0.0.1", port, 0.2, TIMEOUT)


def test_many_threads_share_one_channel(served):
    _, table, channel = served
    errors = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(40):
                keys = rng.integers(0, 500, 200).astype(np.int64)
                ones = np.ones(200, np.float32)
                channel.wait(channel.push("t", keys, np.zeros((200, 5), np.float32), ones, 0 * ones), TIMEOUT)
                channel.wait(channel.pull("t", keys, True), TIMEOUT)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    shows = table.pull(np.arange(500, dtype=np.int64), True)[:, 0]
    assert shows.sum() == 4 * 40 * 200  # every pushed show counted once


def _transport(server_port, server_rank=5):
    failures = []

    def on_failure(rank, what, exc):
        failures.append((rank, what))
        return PeerUnavailableError(f"rank {rank} is unavailable: {what} failed: {exc}", rank=rank)

    t = TcpTransport([("127.0.0.1", server_port)], [server_rank], [0], 0, TIMEOUT, None, on_failure)
    return t, failures


def test_tcp_transport_names_the_server_rank_on_errors(served):
    server, _, _ = served
    transport, failures = _transport(server.port)
    transport.connect()
    try:
        keys = np.arange(4, dtype=np.int64)
        ones = np.ones(4, np.float32)
        h = transport.push(0, "t", keys, np.zeros((4, 5), np.float32), ones, ones, None, 1)
        assert h.wait() == 0 and h.done()
        assert transport.pull(0, "t", keys, False).wait().shape == (4, 5)
        with pytest.raises(ValueError, match=r"no table named 'x' on this server \(raised by rank 5\)"):
            transport.pull(0, "x", keys, False).wait()
        server.stop()
        with pytest.raises(PeerUnavailableError, match="rank 5 is unavailable: pull of table 't'") as e:
            transport.pull(0, "t", keys, False).wait()
        assert e.value.rank == 5 and failures[0][0] == 5
    finally:
        transport.close()
    with pytest.raises(RuntimeError, match="no data-plane channel"):
        transport.pull(0, "t", np.arange(2, dtype=np.int64), False)


def test_a_tcp_handle_waited_from_two_threads_gives_both_the_reply(served):
    # Property: a prefetch thread and the training thread may wait for the same push at once; the channel
    # hands a reply out once, so the handle must give the one reply (or the one error) to every waiter,
    # and none of them may return before the reply has come.
    server, table, _ = served
    transport, _ = _transport(server.port)
    transport.connect()
    try:
        rng = np.random.default_rng(5)
        for round_ in range(50):
            keys = rng.integers(0, 1000, 300).astype(np.int64)
            ones = np.ones(300, np.float32)
            grads = np.zeros((300, 5), np.float32)
            if round_ % 10 == 9:
                grads[7, 2] = np.nan  # a refused push: every waiter gets its error
            h = transport.push(0, "t", keys, grads, ones, ones, None, round_)
            results = []
            barrier = threading.Barrier(3)

            def waiter(h=h, results=results, barrier=barrier):
                barrier.wait()
                try:
                    results.append(h.wait())
                except ValueError as e:
                    results.append(str(e))

            threads = [threading.Thread(target=waiter) for _ in range(2)]
            for t in threads:
                t.start()
            barrier.wait()
            try:
                mine = h.wait()
            except ValueError as e:
                mine = str(e)
            for t in threads:
                t.join()
            assert results == [mine, mine], (round_, results, mine)
            if round_ % 10 == 9:
                assert "NaN" in mine and "raised by rank 5" in mine
            else:
                assert mine == 0
        shows = table.pull(np.arange(1000, dtype=np.int64), True)[:, 0]
        assert shows.sum() == 45 * 300  # each accepted push applied once, the refused ones not at all
    finally:
        transport.close()


def test_data_plane_host(monkeypatch):
    monkeypatch.setenv("PSEMBED_DATA_HOST", "10.1.2.3")
    assert data_plane_host() == "10.1.2.3"
    monkeypatch.delenv("PSEMBED_DATA_HOST")
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    assert data_plane_host() == "127.0.0.1"


def test_error_messages_escape_a_raw_table_name(served):
    server, _, _ = served
    name = b"\xff\xfe\\x"
    frame = REQ.pack(REQ_MAGIC, 1, 0, len(name), 0, 0, 7, 1, 0) + name + bytes(8 - len(name)) + bytes(8)
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
        sock.sendall(frame)
        sock.shutdown(socket.SHUT_WR)  # the server answers, then sees EOF and closes
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    magic, code, _, _, _, rid, _, size = REP.unpack_from(reply)
    assert (magic, code, rid) == (REP_MAGIC, 2, 7)  # NotFound, for request 7
    assert reply[40:40 + size].decode("utf-8") == "no table named '\\xff\\xfe\\x5cx' on this server"


def test_requests_beyond_the_trusted_body_size(served):
    # Bodies over 1 MiB are read into a buffer grown with the bytes received (wire.h limits, data_server.cc):
    # a 200k-key push is ~9.6 MB, then a 200k-key pull, twice (the second reuses the push's buffer).
    _, table, channel = served
    direct = _C.Table(_config())
    rng = np.random.default_rng(5)
    for _ in range(2):
        keys = rng.integers(0, 2**40, 200_000).astype(np.int64)
        grads, shows, clicks, slots = _push_args(rng, keys, 4)
        assert channel.wait(channel.push("t", keys, grads, shows, clicks, slots), TIMEOUT) == 0
        direct.push(keys, grads, shows, clicks, slots)
        np.testing.assert_array_equal(channel.wait(channel.pull("t", keys, True), TIMEOUT), direct.pull(keys, True))
    assert len(table) == len(direct)
