"""Big payloads out of band (protocol.Parts, BYTES/BYTEARRAY frames): values intact, types
and shared objects kept, safe_results still in force, and a worker lost halfway through
a big result fails its job without a hang."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal

import pytest

from sshjobs.remote import protocol
from sshjobs.errors import UnpicklableResult
from sshjobs.safe import RefusedType, make_loads
from sshjobs.worker import Buffered, Worker, decode_results, dumps, Pickled

MB = 1024 * 1024


def parts_of(value, keep=True):
    out = protocol.Parts(keep)
    pickle.Pickler(out, protocol=5).dump(value)
    return out


def received(buffers):
    """The buffers as a receiver makes them from BYTES and BYTEARRAY frames."""
    return [bytearray(b) if kind == protocol.BYTEARRAY else bytes(b) for kind, b in buffers]


def result_body(*values):
    """A RESULT payload as the worker sends it (per-item meta) and its buffers."""
    meta, blobs, buffers = [], [], []
    for v in values:
        p = parts_of(v)
        meta.append((True, "", "", 0.0, p.size, len(p.buffers)))
        blobs.append(p.data())
        buffers += received(p.buffers)
    head = pickle.dumps(meta, protocol=4)
    return protocol.META_LEN.pack(len(head)) + head + b"".join(blobs), buffers


class Sneaky:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_big_payloads_leave_the_pickle_and_come_back_as_the_same_objects():
    data = os.urandom(3 * MB)
    arr = bytearray(data[:MB])
    value = {"b": data, "again": data, "ba": arr, "small": b"s" * 1000, "mid": b"m" * (protocol.OOB_MIN - 1),
             "text": "t" * (2 * MB), "nested": [(1, data), [arr]]}
    out = parts_of(value)
    assert [k for k, _ in out.buffers] == [protocol.BYTES, protocol.BYTEARRAY]
    assert out.buffers[0][1] is data and out.buffers[1][1].obj is arr  # by reference: no copy
    assert out.size < 2 * MB + 200_000  # the text and the small ones stay in band
    got = pickle.loads(out.data(), buffers=received(out.buffers))
    assert got == value
    assert got["b"] is got["again"] is got["nested"][0][1] and got["ba"] is got["nested"][1][0]
    assert type(got["ba"]) is bytearray


def test_the_controller_sends_bytes_from_their_memory_and_mutable_payloads_as_they_were():
    data, arr = os.urandom(MB), bytearray(os.urandom(MB))
    snapshot = bytes(arr)
    p = dumps(((data, arr), {}))
    assert type(p) is Pickled
    assert p.buffers[0][1] is data and p.buffers[1][1] is not arr
    arr[:10] = b"x" * 10  # changed after submit: the job still gets what was submitted
    got = pickle.loads(p.data, buffers=received(p.buffers))
    assert got == ((data, bytearray(snapshot)), {}) and type(got[0][1]) is bytearray
    assert type(dumps(((b"small", 1), {}))) is bytes  # plain small data: plain pickle.dumps
    assert type(dumps(([1, 2], {"k": b"v" * MB}))) is Pickled


def test_only_a_real_payload_opcode_sends_a_payload_out_of_band():
    n = 70_000
    head = b"B" + protocol._U32.pack(n)  # BINBYTES and the length, as the pickler writes them
    frame = b"K" * 100 + head  # a frame whose own data merely ends like that
    cases = [  # (pieces the pickler flushed before an n-byte write, out of band?)
        ([b"\x80\x05\x95" + protocol._U64.pack(len(frame)) + frame], False),
        ([b"\x80\x05\x95" + protocol._U64.pack(len(frame) - 5) + frame], True),
        ([b"\x80\x05K\x01" + head], True),  # a tiny unframed frame, then the opcode
        ([b"\x80\x05" + b"K" * 10 + head], False),  # too much unframed data: not a pickler's flush
        ([b"\x95" + protocol._U64.pack(3) + b"K\x01(", head], True),
        ([b"\x95" + protocol._U64.pack(3) + b"K\x01(" + b"\x96" + protocol._U64.pack(n)], True),
        ([b"\x95" + protocol._U64.pack(3) + b"K\x01(" + b"\x96" + protocol._U64.pack(n + 1)], False),
    ]
    for pieces, oob in cases:
        out = protocol.Parts(True)
        for piece in pieces:
            out.write(piece)
        out.write(bytes(n))
        assert bool(out.buffers) == oob, pieces
        assert out.size == sum(map(len, out.parts))


def test_decode_results_hands_each_value_its_own_buffers():
    a, b = os.urandom(MB), bytearray(os.urandom(MB))
    body, buffers = result_body((1, a), "plain", [b, b])
    got = decode_results(Buffered(body, buffers))
    assert [r[:2] for r in got] == [(True, (1, a)), (True, "plain"), (True, [b, b])]
    assert got[0][1][1] is buffers[0] and got[2][1][0] is buffers[1]
    short = decode_results(Buffered(body, buffers[:1]))  # a buffer missing: that value fails
    assert short[0][0] and short[1][0] and not short[2][0]
    assert isinstance(short[2].value, UnpicklableResult) and short[2].value.type == "UnpicklableResult"


def test_safe_results_still_refuses_a_forbidden_type_inside_a_big_result():
    big = os.urandom(2 * MB)
    body, buffers = result_body([big, Sneaky("/tmp/sshjobs-never-big")], {"ok": big})
    got = decode_results(Buffered(body, buffers), make_loads())
    assert not got[0].ok and got[0].value.type == "UnsafeResult" and "posix.mkdir" in got[0].value.message
    assert got[1][:2] == (True, {"ok": big})  # the next value still gets its own buffer
    assert not os.path.exists("/tmp/sshjobs-never-big")
    with pytest.raises(RefusedType):
        out = parts_of([big, Sneaky("/tmp/sshjobs-never-big")])
        make_loads()(out.data(), buffers=received(out.buffers))


def test_numpy_arrays_go_out_of_band_in_memory_order_and_keep_their_flags():
    np = pytest.importorskip("numpy")
    readonly = np.arange(100_000.0)
    readonly.flags.writeable = False
    grid = np.arange(200_000.0).reshape(400, 500)
    arrays = [np.arange(100_000.0), np.asfortranarray(grid), grid[:, ::2], readonly, np.arange(10)]
    for keep in (True, False):  # the worker's way and the controller's
        for a in arrays:
            out = parts_of(a, keep)
            assert len(out.buffers) == (a.nbytes >= protocol.OOB_MIN) and out.size < 1000
            for loads in (pickle.loads, make_loads()):
                got = loads(out.data(), buffers=received(out.buffers))
                assert np.array_equal(got, a) and got.dtype == a.dtype
                assert got.flags.writeable == a.flags.writeable
                assert got.flags.f_contiguous == a.flags.f_contiguous


# -- against the lab ---------------------------------------------------------------------
def echo(x):
    return x


def make_nested(n):
    import os

    b = os.urandom(n)
    return {"bytes": b, "bytearray": bytearray(b[: n // 2]), "same": [b, (b,)], "text": "x" * 100_000,
            "ints": list(range(1000)), "small": b"y" * 100}


def test_50mb_bytes_and_bytearray_and_nested_values_round_trip(inv):
    data = os.urandom(50 * MB)
    one = inv.select("node01")

    async def go():
        async with one.connect() as c:
            b = (await c.submit(echo, data)).unwrap()
            ba = (await c.submit(echo, bytearray(data))).unwrap()
            nested = (await c.submit(make_nested, 20 * MB)).unwrap()
            safe = (await c.submit(echo, (1, data), safe_results=True)).unwrap()
            mapped = await c.map(echo, [data[:MB], bytearray(data[:MB]), 7])
            return b, ba, nested, safe, mapped

    b, ba, nested, safe, mapped = asyncio.run(go())
    assert type(b) is bytes and b == data
    assert type(ba) is bytearray and ba == data
    assert type(nested["bytearray"]) is bytearray and nested["bytearray"] == nested["bytes"][: 10 * MB]
    assert nested["same"][0] is nested["bytes"] and nested["same"][1][0] is nested["bytes"]
    assert nested["text"] == "x" * 100_000 and nested["ints"] == list(range(1000))
    assert safe == (1, data)
    assert [r.value for r in mapped] == [data[:MB], bytearray(data[:MB]), 7]
    assert type(mapped[1].value) is bytearray
    gathered = inv.gather(echo, data[:5 * MB])  # one pickle, shared by ten frames
    assert all(r.value == data[:5 * MB] for r in gathered)


def test_safe_results_refuses_a_forbidden_type_inside_a_big_result_from_a_host(inv):
    target = "/tmp/sshjobs-never-big-lab"

    def sneaky(n):
        import os

        class S:
            def __reduce__(self):
                return (os.mkdir, (target,))

        return [os.urandom(n), S()]

    r = inv.select("node02").gather(sneaky, 4 * MB, safe_results=True)[0]
    assert not r.ok and r.error.type == "UnsafeResult" and "posix.mkdir" in r.error.message
    assert not os.path.exists(target)


def test_a_big_result_that_does_not_unpickle_fails_alone_and_the_next_values_are_intact(inv):
    def results(n):
        import os

        class Bad:  # pickles fine on the host, raises when the controller unpickles it
            def __reduce__(self):
                return (int, ("not a number",))

        print("per-item results")  # output: each value gets its own pickle and buffers
        return [os.urandom(n), Bad()] if n else os.urandom(2 * 1024 * 1024)

    out = inv.select("node04").map(results, [3 * MB, 0, 0], chunksize=3)
    assert not out[0].ok and out[0].error.type == "UnpicklableResult", out[0]
    assert "ValueError" in out[0].error.message
    assert out[1].ok and out[2].ok and len(out[1].value) == len(out[2].value) == 2 * MB
    assert out[1].value != out[2].value and out[1].stdout == "per-item results\n"


def test_worker_killed_halfway_through_a_big_result_fails_the_job_without_a_hang(inv, monkeypatch, faults):
    """The host's worker dies while its 100 MB result is on the way: WorkerLost, the half
    received buffer is dropped, and the host takes the next job on a new worker."""
    feed = Worker._feed
    killed = []

    def feed_and_kill(self, data):
        feed(self, data)
        frame = self._frame
        if not killed and frame is not None and frame[0] == protocol.BYTES and frame[3] < 90 * MB:
            killed.append(self)
            os.kill(self.hello["pid"], signal.SIGKILL)

    monkeypatch.setattr(Worker, "_feed", feed_and_kill)
    one = inv.select("node03")

    async def go():
        async with one.connect() as c:
            r = await asyncio.wait_for(c.submit(lambda n: b"z" * n, 100 * MB), 60)
            after = await asyncio.wait_for(c.submit(lambda: "fine"), 60)
            return r, after

    with faults.inject("worker SIGKILLed halfway through sending a 100 MB result"):
        r, after = asyncio.run(go())
        assert killed, "the result never came as a BYTES frame"
        assert not r.ok and r.error.type == "WorkerLost" and "signal KILL" in r.error.message
        assert killed[0]._frame is None and not killed[0]._oob
        assert after.value == "fine"
