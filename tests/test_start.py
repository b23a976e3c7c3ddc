"""The command's own start: --version and --help import no asyncssh, asyncssh's import
spawns no subprocess to learn that liboqs is absent, and a command (not a library's
caller) imports the SSH layers without cyclic collections and freezes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, subprocess, sys, traceback
spawned = []  # (command, the asyncssh module that asked), for each subprocess
real = subprocess.Popen.__init__
def spy(self, args, *a, **kw):
    asker = [f.filename.rsplit("/", 1)[-1] for f in traceback.extract_stack() if "asyncssh" in f.filename]
    spawned.append([args if isinstance(args, str) else " ".join(map(str, args)), asker[-1:]])
    real(self, args, *a, **kw)
subprocess.Popen.__init__ = spy
%s
print(json.dumps({"spawned": spawned, "modules": sorted(m for m in sys.modules if m.split(".")[0] in
                  ("asyncssh", "structlog", "rich", "cloudpickle", "asyncio"))}))
"""


def run_json(code: str, env: dict | None = None) -> dict:
    """The JSON object a new interpreter running ``code`` prints last."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def probe(code: str, env: dict | None = None) -> dict:
    return run_json(PROBE % code, env)


def test_version_and_help_import_nothing_heavy():
    for argv in (["--version"], ["--help"], ["run", "--help"]):
        got = probe(f"""
import sys; sys.argv = ["sshjobs", *{argv!r}]
from sshjobs.cli import main
try:
    main()
except SystemExit:
    pass""")
        assert got == {"spawned": [], "modules": []}, argv


def test_import_sshjobs_is_light_and_its_names_load_on_use():
    got = probe("import sshjobs; assert 'Cluster' in dir(sshjobs)")
    assert got["modules"] == []
    got = probe("from sshjobs import Cluster, Inventory, Host, Result, WorkerLost")
    assert "asyncssh" in got["modules"]


def test_asyncssh_imports_without_subprocesses_when_liboqs_is_absent():
    from sshjobs import sshimport

    if any(sshimport.may_exist(n) for n in sshimport.NAMES):
        import pytest

        pytest.skip("liboqs is installed here")
    got = probe("import sshjobs.connection, asyncssh.crypto.pq as pq; assert pq._oqs_lib is None")
    assert "asyncssh" in got["modules"]
    # (umac.py's lookup of libnettle, installed here, is find_library's own: one ldconfig -p)
    assert [cmd for cmd, asker in got["spawned"] if asker == ["pq.py"]] == []


def test_a_liboqs_where_find_library_looks_is_left_to_find_library(tmp_path):
    """A file named like liboqs in LD_LIBRARY_PATH: find_library itself is asked (and here
    finds it unusable), so a real liboqs would be found as asyncssh finds it on its own."""
    (tmp_path / "liboqs.so.5").write_bytes(b"not a shared object")
    got = probe("import sshjobs.connection", env={"LD_LIBRARY_PATH": str(tmp_path)})
    assert [cmd for cmd, asker in got["spawned"] if asker == ["pq.py"]], "find_library was not consulted"


def _gc_after_import(own: bool) -> dict:
    code = f"""
import gc, json, sys
import sshjobs, sshjobs.sshimport as s
{"s.own_process()" if own else ""}
count = [0]
gc.callbacks.append(lambda phase, info: phase == "start" and count.__setitem__(0, count[0] + 1))
import sshjobs.cluster
during = count[0]
print(json.dumps({{"enabled": gc.isenabled(), "frozen": gc.get_freeze_count(), "during": during,
                   "finder_left": s.Finder not in sys.meta_path}}))
"""
    return run_json(code)


def test_a_command_imports_the_ssh_layers_without_collections_and_freezes_them():
    got = _gc_after_import(own=True)
    assert got["enabled"] and got["finder_left"]
    assert got["during"] == 0  # ~100 collections otherwise
    assert got["frozen"] > 50_000


def test_a_library_caller_keeps_its_gc_as_it_was():
    got = _gc_after_import(own=False)
    assert got["enabled"] and got["finder_left"]
    assert got["frozen"] == 0  # the caller's objects are never frozen
    assert got["during"] > 0


def test_x509_names_still_parse_with_their_expressions_compiled_on_first_use():
    code = """
import json, re, sys
import sshjobs, asyncssh
from cryptography import x509
from cryptography.x509 import name
before = type(name._RFC4514NameParser._STRING_RE).__name__
parsed = x509.Name.from_rfc4514_string("CN=h\\u00e9llo,O=Example\\\\, Inc.,2.5.4.3=x").rfc4514_string()
print(json.dumps({"before": before, "parsed": parsed, "restored": re.compile.__module__ == "re",
                  "finder_left": sshjobs.sshimport.Finder not in sys.meta_path}))
"""
    assert run_json(code) == {"before": "_LazyPattern", "parsed": "CN=h\u00e9llo,O=Example\\, Inc.,CN=x",
                              "restored": True, "finder_left": True}
