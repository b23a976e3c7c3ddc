"""The remote half of sshjobs: stdlib-only modules that run on the hosts, shipped whole.

| module | holds | shipped in |
|---|---|---|
| ``protocol`` | the frame format, its kinds (``KINDS``), ``Parts``, HELLO's JSON | both bundles |
| ``files`` | the workdir's files: private folders, the compiled-code cache, removal | both bundles |
| ``worker`` | the worker loop, job output capture, cloudpickle's light loaders | ``WORKER`` |
| ``provision`` | the host side of provisioning: environment ids, uv, builds, list/prune | ``PROVISION`` |
| ``tree`` | the host side of ``sync``: a folder's files compared by content, removals | ``TREE`` |

This file is the controller's alone (never shipped): it reads each module's source once
and builds the bundles.  The controller runs ``python3 -c STUB`` on a host and writes
a bundle's ``start(workdir)`` to its stdin; the STUB makes the package ``sshjobs_remote``
there, runs each module of the bundle as ``sshjobs_remote.NAME``, in order (so their
relative imports find each other in sys.modules), and calls the last one's ``main()``.
Locally the same files are ``sshjobs.remote.protocol`` and so on.
"""

from __future__ import annotations

import hashlib
import marshal
import os
import sys
from importlib.util import MAGIC_NUMBER
from pathlib import Path

from .files import write_private

# The command-line bootstrap.  Its stdin: 8 digits, the length of the line that follows,
# "LENGTH SPLIT KEY WORKDIR-IN-HEX TAG NAME...", then LENGTH bytes: the modules' sources, in
# that order, each ended by a NUL byte (which Python source cannot hold), up to SPLIT; after
# it, their code objects compiled by the controller and marshalled (none when SPLIT =
# LENGTH).  It reads fd 0 unbuffered so that no byte meant for the program (frames, a
# request) is read ahead and lost: in as few reads as the data comes in (a readline there
# reads a byte at a time, ~110 system calls).  Compiling the worker bundle costs 5-13 ms
# of CPU, so the STUB takes, in this order: the shipped code
# when TAG is its own cache_tag and bytecode magic number (what CPython itself checks before
# it loads a .pyc, so 3.11.2 runs 3.11.7's code; marshal and bytecode change only with the
# magic number); the tuple an earlier start cached under WORKDIR/code/KEY-TAG-HEXVERSION;
# else it compiles the sources and the program writes that file (files.save_code).  Code
# is taken only as code objects named for the bundle's modules, in order; a file not its
# user's own or writable by others is not read.  Anything else (a payload that does not
# unmarshal, another Python) falls through to the next.  KEY and WORKDIR "-": no cache.
# The STUB itself is compiled at every start (~0.25 ms of CPU), so it stays terse;
# marshal.loads(f.read()), not marshal.load(f), which calls f.readinto for every few
# bytes (~1 ms of CPU).  Kept to what the oldest host Python runs, so that one can still
# say which Python it is.
STUB = """import os,sys,marshal
r=os.fdopen(0,'rb',0)
def R(n):
 b=bytearray(n);v=memoryview(b);k=0
 while k<n:
  c=r.readinto(v[k:])
  if not c:sys.exit(3)
  k+=c
 return b
h=R(int(R(8))).decode().split();N=h[5:]
b=R(int(h[0]))
P='sshjobs_remote';M=type(sys);m=sys.modules[P]=M(P);m.__path__=[];p=None;i=int(h[1])
def L(d):
 c=marshal.loads(d)
 if[x.co_filename for x in c]!=[P+'/'+k+'.py'for k in N]:raise ValueError
 return c
try:
 t=sys.implementation.cache_tag
 if h[4]!=t+'-'+__import__('_frozen_importlib_external').MAGIC_NUMBER.hex():raise ValueError
 c=L(memoryview(b)[i:])
except Exception:
 try:
  p=os.path.expanduser(bytes.fromhex(h[3]).decode())+'/code/%s-%s-%x'%(h[2],t,sys.hexversion)
  with open(p,'rb') as f:
   s=os.fstat(f.fileno())
   if s.st_uid!=os.getuid() or s.st_mode&18:raise ValueError
   c=L(f.read())
 except Exception:
  c=()
  for k,s in zip(N,b[:i].split(b'\\0')):c+=compile(s,P+'/'+k+'.py','exec'),
  m.CODE_CACHE=p and(p,c)
for k,x in zip(N,c):
 d=sys.modules[P+'.'+k]=M(P+'.'+k);d.__package__=P;exec(x,d.__dict__)
d.main()"""

_HERE = Path(__file__).parent
_OPTIMIZE = 2  # how the controller compiles the code it ships: see Bundle.code
# Which hosts can run code compiled here: the STUB's test of a header's TAG.
TAG = f"{sys.implementation.cache_tag}-{MAGIC_NUMBER.hex()}"
# Every remote module's source, read once: what the bundles send and their cache keys hash.
SOURCES = {name: (_HERE / f"{name}.py").read_bytes() for name in ("protocol", "files", "worker", "provision", "tree")}


class Bundle:
    """Whole remote modules, in import order, as the STUB reads them; the last one's
    ``main()`` is the program."""

    def __init__(self, *names: str):
        self.names = names
        self.data = b"".join(SOURCES[n] + b"\0" for n in names)
        # the name of the compiled code in a host's workdir and in the controller's cache
        # (the STUB, the sources and how the controller compiles them)
        self.key = hashlib.sha256(b"\0".join((STUB.encode(), f"optimize={_OPTIMIZE}".encode(), " ".join(names).encode(),
                                              self.data))).hexdigest()[:32]
        self._code: bytes | None = None

    @property
    def code(self) -> bytes:
        """The modules compiled here and marshalled, for hosts whose TAG is the controller's
        (on first use; kept in the user's cache folder, ``code_cache()``, since compiling
        the worker bundle costs a command ~14 ms of CPU).  Without docstrings (``-OO``'s
        compile: the remote modules use neither docstrings nor asserts), which a host
        would unmarshal at every start for nothing."""
        if self._code is None:
            path = code_cache() / f"{self.key}-{TAG}"
            self._code = self._cached(path)
            if self._code is None:
                self._code = marshal.dumps(tuple(
                    compile(SOURCES[n], f"sshjobs_remote/{n}.py", "exec", dont_inherit=True, optimize=_OPTIMIZE)
                    for n in self.names))
                try:
                    write_private(str(path), self._code)
                except OSError:
                    pass  # a cache that cannot be written: compiled again next time
        return self._code

    def _cached(self, path: Path) -> bytes | None:
        """The cached code when it is this user's own file, writable by nobody else, and
        unmarshals to this bundle's modules."""
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_uid != os.getuid() or st.st_mode & 0o022:
                    return None
                data = f.read()
            code = marshal.loads(data)
        except (OSError, ValueError, EOFError, TypeError):
            return None
        names = [f"sshjobs_remote/{n}.py" for n in self.names]
        if not isinstance(code, tuple) or [getattr(c, "co_filename", None) for c in code] != names:
            return None
        return data

    def header(self, workdir: str | None = None, code: bytes = b"") -> bytes:
        """The STUB's first line; without a workdir nothing is cached on the host, without
        ``code`` nothing compiled is shipped."""
        key, where = (self.key, workdir.encode().hex()) if workdir else ("-", "-")
        size = len(self.data)
        return header_line(f"{size + len(code)} {size} {key} {where} {TAG if code else '-'} {' '.join(self.names)}")

    def start(self, workdir: str | None = None, compiled: bool = True) -> bytes:
        """What the STUB reads from stdin before the program does: header, sources and
        (``compiled``) the controller's code objects, which a host of another TAG ignores."""
        code = self.code if compiled else b""
        return self.header(workdir, code) + self.data + code


def header_line(text: str) -> bytes:
    """A STUB header line as it goes on the wire: its length in 8 digits, then the line."""
    line = f"{text}\n".encode()
    return b"%08d" % len(line) + line


def code_cache() -> Path:
    """The controller's folder of compiled bundles: ``$XDG_CACHE_HOME/sshjobs/code``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sshjobs" / "code"


WORKER = Bundle("protocol", "files", "worker")
PROVISION = Bundle("protocol", "files", "provision")
TREE = Bundle("files", "tree")
