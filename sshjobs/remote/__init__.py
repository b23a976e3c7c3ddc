"""The remote half of sshjobs: stdlib-only modules that run on the hosts, shipped whole.

| module | holds | shipped in |
|---|---|---|
| ``protocol`` | the frame format, its kinds (``KINDS``), ``Parts``, HELLO's JSON | both bundles |
| ``files`` | the workdir's files: private folders, the compiled-code cache, removal | both bundles |
| ``worker`` | the worker loop, job output capture, cloudpickle's light loaders | ``WORKER`` |
| ``provision`` | the host side of provisioning: environment ids, uv, builds, list/prune | ``PROVISION`` |

This file is the controller's alone (never shipped): it reads each module's source once
and builds the two bundles.  The controller runs ``python3 -c STUB`` on a host and writes
a bundle's ``start(workdir)`` to its stdin; the STUB makes the package ``sshjobs_remote``
there, runs each module of the bundle as ``sshjobs_remote.NAME``, in order (so their
relative imports find each other in sys.modules), and calls the last one's ``main()``.
Locally the same files are ``sshjobs.remote.protocol`` and so on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# The command-line bootstrap.  Its stdin: a line "LENGTH KEY WORKDIR-IN-HEX NAME...", then
# LENGTH bytes: the modules' sources, in that order, each ended by a NUL byte (which Python
# source cannot hold).  It reads fd 0 unbuffered so that no byte meant for the program
# (frames, a request) is read ahead and lost.  It runs the tuple of code objects that an
# earlier start cached under WORKDIR/code/KEY-... (compiling the worker bundle costs
# several ms of CPU), and compiles the sources when that file is missing, unreadable, not
# its user's own, writable by others or not such a tuple; the program writes it then
# (files.save_code).  KEY and WORKDIR "-": no cache.  The STUB itself is compiled at every
# start (~0.25 ms of CPU), so it stays terse; marshal.loads(f.read()), not marshal.load(f),
# which calls f.readinto for every few bytes (~1 ms of CPU).  Kept to what the oldest host
# Python runs, so that one can still say which Python it is.
STUB = """import os,sys,types,marshal
r=os.fdopen(0,'rb',0)
h=r.readline().decode().split();N=h[3:]
n=int(h[0]);b=bytearray()
while len(b)<n:
 c=r.read(n-len(b))
 if not c:sys.exit(3)
 b+=c
P='sshjobs_remote';m=sys.modules[P]=types.ModuleType(P);m.__path__=[];p=None
try:
 p=os.path.expanduser(bytes.fromhex(h[2]).decode())+'/code/%s-%s-%x'%(h[1],sys.implementation.cache_tag,sys.hexversion)
 with open(p,'rb') as f:
  s=os.fstat(f.fileno())
  if s.st_uid!=os.getuid() or s.st_mode&18:raise ValueError
  c=marshal.loads(f.read())
 if tuple(map(type,c))!=len(N)*(types.CodeType,):raise ValueError
except Exception:
 c=()
 for k,s in zip(N,b.split(b'\\0')):c+=compile(s,P+'/'+k+'.py','exec'),
 m.CODE_CACHE=p and(p,c)
for k,x in zip(N,c):
 d=sys.modules[P+'.'+k]=types.ModuleType(P+'.'+k);d.__package__=P;exec(x,d.__dict__)
d.main()"""

_HERE = Path(__file__).parent
# Every remote module's source, read once: what the bundles send and their cache keys hash.
SOURCES = {name: (_HERE / f"{name}.py").read_bytes() for name in ("protocol", "files", "worker", "provision")}


class Bundle:
    """Whole remote modules, in import order, as the STUB reads them; the last one's
    ``main()`` is the program."""

    def __init__(self, *names: str):
        self.names = names
        self.data = b"".join(SOURCES[n] + b"\0" for n in names)
        # the name of the compiled code in a host's workdir (the stub's reading of it too)
        self.key = hashlib.sha256(b"\0".join((STUB.encode(), " ".join(names).encode(), self.data))).hexdigest()[:32]

    def header(self, workdir: str | None = None) -> bytes:
        """The STUB's first line; without a workdir the code is compiled and not cached."""
        key, where = (self.key, workdir.encode().hex()) if workdir else ("-", "-")
        return f"{len(self.data)} {key} {where} {' '.join(self.names)}\n".encode()

    def start(self, workdir: str | None = None) -> bytes:
        """What the STUB reads from stdin before the program does: header and sources."""
        return self.header(workdir) + self.data


WORKER = Bundle("protocol", "files", "worker")
PROVISION = Bundle("protocol", "files", "provision")
