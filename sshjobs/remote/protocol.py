"""The frame format both ends speak, and the values it carries.

Wire format, both directions: frames of ``HEADER`` (kind, job id, payload length)
followed by the payload.  ``KINDS`` names each kind (``KINDS[4] == "CALL"``).  Nothing
else is ever written to the worker's protocol stream (see ``worker.main``).

Big payloads travel out of band, both ways: a pickle (protocol 5) of a value holding a
bytes, bytearray or contiguous buffer (a numpy array, say) of ``OOB_MIN`` bytes or more
carries a NEXT_BUFFER opcode in its place, and the buffer itself goes raw in a ``BYTES``
or ``BYTEARRAY`` frame of the same job id just before the job's CALL, MAP or RESULT frame
(see ``Parts``).  The receiver makes each such frame the final bytes or bytearray as it
arrives and hands the job's buffers, in order, to the unpickler (``buffers=``): a 200 MB
value is neither copied into a pickle by the sender nor out of one by the receiver (the
controller copies a mutable argument once, when it is submitted).

Stdlib only, and no syntax newer than the oldest host Python that must still be able to
say which Python it is: this module runs on the hosts too.
"""

import os

try:  # the C module: struct.py is one more module read from the disk at each worker start
    from _struct import Struct
except ImportError:  # pragma: no cover
    from struct import Struct

HEADER = Struct("!BIQ")

KINDS = {}  # code -> name ("CALL"), for traces and errors


def _kind(code, name):
    KINDS[code] = name
    return code


# controller -> worker
CONFIG = _kind(1, "CONFIG")  # pickled {"cloudpickle": version, "workdir": path, "env": {...}} (JSON too)
MODULES = _kind(2, "MODULES")  # pickled {relative path: source} of cloudpickle: NEED_MODULES' answer
FUNC = _kind(3, "FUNC")  # job id = function id; payload: cloudpickled callable
CALL = _kind(4, "CALL")  # FID + pickled (args, kwargs): one result
MAP = _kind(5, "MAP")  # FID + pickled (items,): one result per item
SHUTDOWN = _kind(6, "SHUTDOWN")
# worker -> controller
HELLO = _kind(10, "HELLO")  # JSON facts about the host and worker
RESULT = _kind(11, "RESULT")  # META_LEN + pickled meta + the pickled values, one after the other
OUTPUT = _kind(12, "OUTPUT")  # payload: OUTPUT_HEAD (stream 1 stdout / 2 stderr, item) + utf-8 text
FATAL = _kind(13, "FATAL")  # JSON: the worker cannot go on
NEED_MODULES = _kind(16, "NEED_MODULES")  # a job needs cloudpickle and the host has not the controller's
# both ways: one out-of-band buffer of the job's next CALL, MAP or RESULT frame, raw
BYTES = _kind(14, "BYTES")  # the receiver makes it a bytes
BYTEARRAY = _kind(15, "BYTEARRAY")  # ... a bytearray (it stood for a bytearray or a writable buffer)
OOB_MIN = 64 * 1024  # payloads this big leave the pickle (= pickle's own frame size)


META_LEN = Struct("!I")
# RESULT meta: a list of (ok, stdout, stderr, duration, size of the value's pickle, number
# of out-of-band buffers it takes), one per item; or (ALL_OK, durations): one pickled
# list holds every value (and takes all of the job's buffers).
ALL_OK = "all-ok"
FID = Struct("!I")  # the function id that starts a CALL or MAP payload (the rest is
# pickled on its own, so the controller pickles an argument once for every host)
OUTPUT_HEAD = Struct("!BI")  # stream, index of the item within a MAP job
STDOUT, STDERR = 1, 2

# Index settings from the host's environment: part of an environment's id, so HELLO
# reports them (the controller predicts the id from them) and provisioning hashes them.
INDEX_ENV = ("UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX", "UV_EXTRA_INDEX_URL", "UV_FIND_LINKS",
             "UV_NO_INDEX", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX")


def index_env():
    """The INDEX_ENV settings of this process, as ``NAME=value`` strings."""
    return ["%s=%s" % (k, os.environ[k]) for k in INDEX_ENV if os.environ.get(k)]


def pack(kind, job_id, payload=b""):
    return HEADER.pack(kind, job_id, len(payload)) + payload


def read_frame(stream):
    """Read one frame from a binary stream; None at end of stream.  A BYTEARRAY frame's
    payload is read straight into a bytearray, any other into one bytes object."""
    head = _read_exact(stream, HEADER.size)
    if head is None:
        return None
    kind, job_id, size = HEADER.unpack(head)
    if kind == BYTEARRAY:
        payload = _read_bytearray(stream, size)
    else:
        payload = _read_exact(stream, size) if size else b""
    if payload is None:
        return None
    return kind, job_id, payload


def _read_bytearray(stream, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        more = stream.readinto(view[got:])
        if not more:
            return None
        got += more
    view.release()
    return buf


def _read_exact(stream, n):
    data = stream.read(n)
    if data is None or len(data) < n:
        if not data:
            return None
        parts = [data]
        got = len(data)
        while got < n:
            more = stream.read(n - got)
            if not more:
                return None
            parts.append(more)
            got += len(more)
        data = b"".join(parts)
    return data


_PAYLOAD_HEADS = {0x42: (5, BYTES), 0x8E: (9, BYTES), 0x96: (9, BYTEARRAY)}  # BINBYTES, BINBYTES8, BYTEARRAY8
_U32 = Struct("<I")
_U64 = Struct("<Q")


class Parts(object):
    """The file a protocol-5 pickler writes to: it keeps the pieces instead of joining
    them, and takes big payloads out of band.

    The C pickler writes a bytes or bytearray payload of 64 KiB or more (a buffer such as
    a numpy array's too) as the object itself, in a write of its own, right after flushing
    its buffer, which then ends with the payload's opcode and length.  When a write is such
    a payload of OOB_MIN bytes or more, that opcode becomes NEXT_BUFFER (+ READONLY_BUFFER
    for bytes) and the payload goes to ``buffers`` as (BYTES or BYTEARRAY, object): the
    receiver gets it as a frame of its own and passes it to the unpickler (``buffers=``),
    which puts that very object in the value.  Anything else stays in ``parts``.
    ``keep``: keep mutable payloads by reference; the controller copies them (the caller
    may change a bytearray or an array after submitting it), the worker does not."""

    def __init__(self, keep):
        self.parts = []  # the in-band pickle, in pieces
        self.size = 0
        self.buffers = []  # out-of-band, in the order the pickle takes them
        self.keep = keep

    def write(self, data):
        if type(data) is bytes:
            n = len(data)
        else:
            view = memoryview(data)
            n = view.nbytes
            # by reference only where it may be and can be written as it is; else a copy
            # in memory order (what the pickler would have copied into its own buffer)
            data = view if self.keep and n >= OOB_MIN and view.c_contiguous else view.tobytes("A")
        if n >= OOB_MIN and self.parts:
            kind = self._payload_kind(n)
            if kind:
                self.buffers.append((kind, data))
                return n
        self.parts.append(data)
        self.size += n
        return n

    def _payload_kind(self, n):
        """BYTES or BYTEARRAY if the last piece ends with the opcode of an n-byte payload
        (which it then trades for NEXT_BUFFER), else 0.  The piece is parsed from its
        start, so that data that merely looks like such an opcode is never taken for one:
        [PROTO] [FRAME length frame | up to 3 unframed bytes] opcode length."""
        parts = self.parts
        p = parts[-1]
        if type(p) is not bytes:
            return 0
        i = 2 if len(parts) == 1 and p[:1] == b"\x80" else 0
        framed = p[i:i + 1] == b"\x95"
        if framed:
            if len(p) < i + 9:
                return 0
            i += 9 + _U64.unpack_from(p, i + 1)[0]
        for hlen, length in ((5, _U32), (9, _U64)):
            extra = len(p) - hlen - i
            if extra < 0 or extra > (0 if framed else 3):
                continue
            head = _PAYLOAD_HEADS.get(p[len(p) - hlen])
            if head is None or head[0] != hlen or length.unpack_from(p, len(p) - hlen + 1)[0] != n:
                continue
            kind = head[1]
            parts[-1] = p[:len(p) - hlen] + (b"\x97\x98" if kind == BYTES else b"\x97")
            self.size += len(parts[-1]) - len(p)
            return kind
        return 0

    def data(self):
        """The in-band pickle as one bytes (it is small once the payloads are out)."""
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


class Reader(object):
    """A read-only file over a buffer, for an unpickler: io.BytesIO would copy a
    memoryview first."""

    def __init__(self, data):
        self.view = memoryview(data)
        self.pos = 0

    def read(self, n=-1):
        end = len(self.view) if n is None or n < 0 else min(len(self.view), self.pos + n)
        chunk = self.view[self.pos:end].tobytes()
        self.pos = end
        return chunk

    def readinto(self, buf):
        n = min(len(buf), len(self.view) - self.pos)
        buf[:n] = self.view[self.pos:self.pos + n]
        self.pos += n
        return n

    def readline(self):
        end = self.pos
        while end < len(self.view):
            i = self.view[end:end + 4096].tobytes().find(b"\n")
            if i >= 0:
                return self.read(end + i + 1 - self.pos)
            end += 4096
        return self.read()


def _json(value):
    """JSON for HELLO's and FATAL's plain values (str, int, bool, None, lists, dicts of
    them) without importing json, whose `re` costs every worker start ~2 ms.  Strings
    come out ASCII, as json.dumps writes them."""
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        out = []
        for c in value:
            o = ord(c)
            if c == '"' or c == "\\":
                out.append("\\" + c)
            elif 0x20 <= o < 0x7F:
                out.append(c)
            elif o > 0xFFFF:
                o -= 0x10000
                out.append("\\u%04x\\u%04x" % (0xD800 | (o >> 10), 0xDC00 | (o & 0x3FF)))
            else:
                out.append("\\u%04x" % o)
        return '"' + "".join(out) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_json(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join("%s: %s" % (_json(str(k)), _json(v)) for k, v in value.items()) + "}"
    return _json(str(value))


def error_info(exc):
    """(type name, message, traceback text, module of the type) of an exception, for the
    controller (which raises it as that type too when it has the class)."""
    import traceback  # imported when first needed: it pulls in re, tokenize, linecache

    return (
        type(exc).__qualname__,
        str(exc),
        "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        type(exc).__module__,
    )
