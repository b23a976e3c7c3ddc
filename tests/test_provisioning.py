"""Runtime dependencies on a 10-host lab: uv environments cached by content, online and offline.

Every test uses its own workdir on the hosts (a cold start: no environment, no uv), while
each lab user keeps its own uv cache in its home, so repeated runs download little.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from sshjobs import Inventory
from sshjobs.remote import PROVISION, STUB, provision
from sshjobs.inventory import Host
from sshjobs.errors import RequirementsError
from sshjobs.provisioning import parse_age, parse_requirements, platform_args

from .conftest import host_path

CLOSED_INDEX = "http://127.0.0.1:9/simple"  # the discard port: nothing listens, so connects are refused


@pytest.fixture
def workdir(lab):
    tag = uuid.uuid4().hex[:8]
    paths = {}

    def make(index: int, host: Host) -> str:
        wd = f"~/.cache/sshjobs-t{tag}" if lab.root else f"{host.workdir}-t{tag}"
        paths[index] = wd
        return wd

    yield make
    for i, wd in paths.items():
        shutil.rmtree(host_path(lab, i, wd), ignore_errors=True)


def lab_inventory(lab, workdir, env=None, per_host=None, **host_changes) -> Inventory:
    """The lab's hosts, as users have them (no certificate settings), with a fresh workdir
    and extra env per host."""
    hosts = []
    for i, h in enumerate(Inventory.load(lab.inventory_path).hosts):
        e = {**dict(h.env), **(env or {})}
        changes = dict(host_changes)
        for k, v in ((per_host or {}).get(i) or {}).items():
            if k == "env":
                e.update(v)
            else:
                changes[k] = v
        hosts.append(replace(h, workdir=workdir(i, h), env=tuple(e.items()), **changes))
    return Inventory(hosts)


def eig_job(n):
    import sys

    import numpy as np

    m = np.arange(n * n, dtype=float).reshape(n, n)
    return sorted(np.linalg.eigvalsh(m + m.T).tolist()), np.__version__, sys.prefix


def run_f2py():
    import subprocess
    import sys

    return subprocess.run([sys.prefix + "/bin/f2py", "-v"], capture_output=True).returncode


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


# -- no lab needed ----------------------------------------------------------------------------
def test_requirements_from_list_string_and_file(tmp_path):
    assert parse_requirements(["numpy==2.*", "six", "numpy==2.*"]) == (["numpy==2.*", "six"], [])
    assert parse_requirements("six") == (["six"], [])
    req = tmp_path / "requirements.txt"
    req.write_text("# tools\n--index-url https://example.org/simple\nsix  # inline comment\n\nattrs>=22\n")
    assert parse_requirements(req) == (["attrs>=22", "six"], ["--index-url https://example.org/simple"])
    assert parse_requirements(str(req)) == parse_requirements(req)
    with pytest.raises(RequirementsError, match="cannot read"):
        parse_requirements(tmp_path / "missing.txt")
    with pytest.raises(RequirementsError, match="unsupported"):
        parse_requirements(["-r other.txt"])
    with pytest.raises(RequirementsError, match="no requirements"):
        parse_requirements([])


def test_env_id_depends_on_python_set_and_index_not_order():
    a = provision.env_hash("cpython-3.11.2 /usr/bin/python3.11", ["six", "attrs"], [])
    assert a == provision.env_hash("cpython-3.11.2 /usr/bin/python3.11", ["attrs", "six", "six"], [])
    assert a != provision.env_hash("cpython-3.12.1 /usr/bin/python3.12", ["six", "attrs"], [])
    assert a != provision.env_hash("cpython-3.11.2 /usr/bin/python3.11", ["six"], [])
    assert a != provision.env_hash("cpython-3.11.2 /usr/bin/python3.11", ["six", "attrs"], ["UV_INDEX_URL=http://x"])


def test_platform_args_and_ages():
    args = platform_args({"version": "3.11.2", "implementation": "cpython", "platform": "linux",
                          "machine": "x86_64", "libc": "glibc 2.36"})
    assert args[:4] == ["--python-version", "3.11", "--implementation", "cp"]
    assert "cp311" in args and "manylinux_2_36_x86_64" in args and "manylinux_2_17_x86_64" in args
    assert "manylinux2014_x86_64" in args and "manylinux_2_37_x86_64" not in args
    assert parse_age("7d") == 7 * 86400 and parse_age("90") == 90 and parse_age(30) == 30
    with pytest.raises(ValueError):
        parse_age("soon")


def test_uv_trusts_the_system_store_unless_the_env_says_otherwise():
    """uv 0.11 renamed UV_NATIVE_TLS to UV_SYSTEM_CERTS and later warns about the old name."""
    assert provision.uv_tls_env("uv 0.13.9 (x86_64-unknown-linux-gnu)", {}) == {"UV_SYSTEM_CERTS": "1"}
    assert provision.uv_tls_env("uv 0.11.0", {}) == {"UV_SYSTEM_CERTS": "1"}
    assert provision.uv_tls_env("uv 0.4.30", {}) == {"UV_NATIVE_TLS": "1"}
    assert provision.uv_tls_env("uv something", {}) == {"UV_SYSTEM_CERTS": "1", "UV_NATIVE_TLS": "1"}
    for name in provision.UV_TLS_SETTINGS:  # the user's choice, either way
        assert provision.uv_tls_env("uv 0.13.9", {name: "0"}) == {}
    assert provision.cert_error("  cause: invalid peer certificate: UnknownIssuer")
    assert provision.cert_error("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local")
    assert not provision.cert_error("Because certificate-tools was not found in the package registry")


def test_provision_request_locally_over_a_pipe(tmp_path):
    """The host half on its own: list and prune an environment folder."""
    envs = tmp_path / "wd" / "envs"
    (envs / "abc").mkdir(parents=True)
    (envs / "abc" / provision.ENV_MARKER).write_text(json.dumps({"hash": "abc", "requirements": ["six"]}))
    (envs / ".tmp-def-123").mkdir()  # an interrupted build
    (envs / ".tmp-def-123.txt").write_text("six\n")

    def call(req):
        data = PROVISION.start() + json.dumps(req).encode()
        out = subprocess.run([sys.executable, "-c", STUB], input=data, capture_output=True, check=True).stdout
        return json.loads(out)

    listed = call({"op": "list", "workdir": str(tmp_path / "wd")})
    assert [(e["hash"], e["complete"], e["requirements"]) for e in listed["envs"]] == [("abc", True, ["six"])]
    pruned = call({"op": "prune", "workdir": str(tmp_path / "wd"), "older_than": 3600})
    assert pruned["removed"] == [".tmp-def-123", ".tmp-def-123.txt"]
    assert (envs / "abc").is_dir()
    assert call({"op": "prune", "workdir": str(tmp_path / "wd"), "older_than": 0})["removed"] == ["abc"]
    assert not (envs / "abc").exists()
    bad = call({"op": "nonsense", "workdir": str(tmp_path / "wd"), "requirements": ["six"]})
    assert bad["ok"] is False and "unknown request" in bad["error"]


# -- the lab -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_install_numpy_on_every_host_then_run_jobs_in_it(lab, workdir):
    inv = lab_inventory(lab, workdir)
    events = []

    async def go():
        async with inv.connect(on_event=lambda h, e, i: events.append((h, e))) as cluster:
            t0 = time.perf_counter()
            first = await cluster.install(["numpy"])
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = await cluster.install(["numpy"])
            noop = time.perf_counter() - t0
            submitted = await cluster.submit(eig_job, 6)  # right after an install: workers are there
            jobs = await cluster.gather(eig_job, 6)
            scripts = await cluster.gather(run_f2py)
            return first, cold, again, noop, jobs, submitted, scripts

    first, cold, again, noop, jobs, submitted, scripts = asyncio.run(go())
    print(f"cold numpy install on 10 hosts: {cold:.2f}s; no-op install: {noop * 1000:.0f} ms")
    assert all(r.ok for r in first), [r.error for r in first if not r.ok]
    for i, r in enumerate(first):
        v = r.value
        assert v["cached"] is False and v["uv"] == "uploaded"  # the lab hosts have no uv of their own
        home_env = host_path(lab, i, inv.hosts[i].workdir) / "envs" / v["hash"]
        assert v["env"] == str(home_env) and v["python"] == f"{home_env}/bin/python"
        assert (home_env / provision.ENV_MARKER).is_file() and private(home_env) and private(home_env.parent)
        assert private(home_env.parent.parent / "bin" / "uv")
        assert not [p for p in home_env.parent.iterdir() if p.name.startswith(".tmp-")]
    assert len({r.value["hash"] for r in first}) == 1  # same Python, same set: same id everywhere
    # the second install is the no-op path: nothing built, one quick round trip
    assert all(r.ok and r.value["cached"] is True for r in again)
    assert [r.value["env"] for r in again] == [r.value["env"] for r in first]
    assert noop < 3.0
    # jobs ran in the environment, importing its numpy, and agree with the controller
    import numpy as np

    m = np.arange(36, dtype=float).reshape(6, 6)
    expected = sorted(np.linalg.eigvalsh(m + m.T).tolist())
    for r, inst in zip(jobs, first):
        assert r.ok, r.error
        values, version, prefix = r.value
        assert prefix == inst.value["env"]
        assert np.allclose(values, expected)
    assert [r.value for r in scripts] == [0] * 10  # console scripts work after the rename (--relocatable)
    assert submitted.ok and submitted.value[2] in {r.value["env"] for r in first}
    assert ("node01", "installing") in events and ("node01", "installed") in events


@pytest.mark.slow
def test_gather_and_map_with_requirements_skip_a_host_whose_install_failed(lab, workdir):
    # node03 can only reach a closed index: its install fails, the others go on
    inv = lab_inventory(lab, workdir, per_host={2: {"env": {"UV_INDEX_URL": CLOSED_INDEX}}})

    def marker_job(x=0):
        import os

        import six  # noqa: F401

        open(os.path.expanduser("~/ran-" + str(os.getpid())), "w").close()
        return x * 2

    async def go():
        async with inv.connect() as cluster:
            gathered = await cluster.gather(marker_job, 1, requirements=["six"])
            mapped = await cluster.map(marker_job, range(50), requirements=["six"])
            return gathered, mapped

    before = list(lab.home(2).glob("ran-*"))
    gathered, mapped = asyncio.run(go())
    bad = gathered[2]
    assert not bad.ok and bad.error.type == "InstallError"
    assert "127.0.0.1:9" in bad.error.message or "Connection refused" in bad.error.message, bad.error.message
    assert all(r.ok and r.value == 2 for i, r in enumerate(gathered) if i != 2), gathered
    assert [r.value for r in mapped] == [x * 2 for x in range(50)]
    assert "node03" not in {r.host for r in mapped}
    assert list(lab.home(2).glob("ran-*")) == before  # the job never ran there
    for i in range(10):
        for p in lab.home(i).glob("ran-*"):
            p.unlink()


@pytest.mark.slow
def test_nonexistent_package_fails_each_host_with_uvs_message_and_runs_nothing(lab, workdir):
    inv = lab_inventory(lab, workdir)
    name = "sshjobs-no-such-package-" + uuid.uuid4().hex[:6]
    results = inv.gather(lambda: "ran", requirements=[name])
    for r in results:
        assert not r.ok and r.error.type == "InstallError"
        assert name in r.error.message and "not found" in r.error.message, r.error.message
    mapped = inv.map(lambda x: x, range(5), requirements=[name])
    assert [(r.ok, r.job, r.error.type) for r in mapped] == [(False, i, "InstallError") for i in range(5)]
    assert name in mapped[0].error.message
    envs = host_path(lab, 0, inv.hosts[0].workdir) / "envs"
    assert [p.name for p in envs.iterdir() if not p.name.endswith(".lock")] == []  # nothing half-built left


def host_env(names):
    import os

    return {k: os.environ[k] for k in names if k in os.environ}


TLS_NAMES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "PIP_CERT", "UV_SYSTEM_CERTS", "UV_NATIVE_TLS")


@pytest.mark.slow
def test_install_on_hosts_without_certificate_settings_and_with_a_bundle_in_env(lab, workdir):
    """The hosts as users have them: nothing of the controller's TLS settings. Behind this
    network's TLS-inspecting proxy uv gets through only with the system store (or the bundle
    the inventory names). UV_NO_CACHE: the index itself must answer, not the lab user's cache."""
    bundle = "/etc/ssl/certs/ca-certificates.crt"
    inv = lab_inventory(lab, workdir, env={"UV_NO_CACHE": "1"},
                        per_host={1: {"env": {"SSL_CERT_FILE": bundle}}}).select("node01,node02")
    seen = inv.gather(host_env, TLS_NAMES)
    assert [r.value for r in seen] == [{}, {"SSL_CERT_FILE": bundle}]
    results = inv.install(["six"])
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert inv.gather(lambda: __import__("six").__name__, requirements=["six"])[0].value == "six"


def _tiny_wheel(folder: Path) -> Path:
    """A one-module wheel (sshjobs-tls-probe 1.0) for a local index."""
    import base64
    import hashlib
    import zipfile

    files = {"sshjobs_tls_probe/__init__.py": b"VALUE = 42\n",
             "sshjobs_tls_probe-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: sshjobs-tls-probe\nVersion: 1.0\n",
             "sshjobs_tls_probe-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: sshjobs-tests\n"
                                                      b"Root-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join("%s,sha256=%s,%d\n" % (name, base64.urlsafe_b64encode(hashlib.sha256(data).digest())
                                             .rstrip(b"=").decode(), len(data)) for name, data in files.items())
    path = folder / "sshjobs_tls_probe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("sshjobs_tls_probe-1.0.dist-info/RECORD", record + "sshjobs_tls_probe-1.0.dist-info/RECORD,,\n")
    return path


def _ca_and_server_cert(folder: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate for 127.0.0.1 it signed: what a TLS-inspecting proxy shows."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, key, signer, ca):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        else:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sshjobs test proxy CA")])
    ca = cert(ca_name, ca_name, ca_key, ca_key, True)
    leaf = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name, key, ca_key, False)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture
def private_ca_index():
    """(index URL, CA bundle path): a package index on 127.0.0.1 over HTTPS whose certificate
    only a private CA vouches for, as behind a TLS-inspecting proxy. The folder is readable
    by the lab users (the bundle is a path on the hosts)."""
    import http.server
    import ssl
    import threading

    folder = Path(tempfile.mkdtemp(prefix="sshjobs-tls-", dir="/tmp"))
    folder.chmod(0o755)
    wheel = _tiny_wheel(folder)
    ca, certfile, keyfile = _ca_and_server_cert(folder)
    ca.chmod(0o644)

    class Index(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # uv asks before it fetches a wheel (range requests for its metadata)
            self.do_GET(head=True)

        def do_GET(self, head=False):
            if self.path.rstrip("/") == "/simple/sshjobs-tls-probe":
                body = f'<a href="/files/{wheel.name}">{wheel.name}</a>'.encode()
                kind = "text/html"
            elif self.path == f"/files/{wheel.name}":
                body, kind = wheel.read_bytes(), "application/octet-stream"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certfile, keyfile)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}/simple", str(ca)
    server.shutdown()
    server.server_close()
    shutil.rmtree(folder)


@pytest.mark.slow
def test_a_ca_bundle_in_the_inventory_env_is_trusted_and_its_absence_explained(lab, workdir, private_ca_index):
    url, ca = private_ca_index
    inv = lab_inventory(lab, workdir, env={"UV_INDEX_URL": url, "UV_NO_CACHE": "1"},
                        per_host={1: {"env": {"SSL_CERT_FILE": ca}}}).select("node01,node02")
    refused, trusted = inv.install(["sshjobs-tls-probe"])
    assert not refused.ok and refused.error.type == "InstallError"
    msg = refused.error.message
    assert "UnknownIssuer" in msg, msg  # neither the system store nor uv's own roots know the CA
    assert "nor with uv's own roots" in msg and 'env = { SSL_CERT_FILE = "' in msg, msg
    assert trusted.ok, trusted.error
    ran = inv.select("node02").gather(lambda: __import__("sshjobs_tls_probe").VALUE,
                                      requirements=["sshjobs-tls-probe"])
    assert ran[0].value == 42


_CONCURRENT = r"""
import json, os, sys
from sshjobs import Inventory
barrier = sys.argv[2]
import asyncio
async def go():
    async with Inventory.from_hosts(json.loads(sys.argv[1])).connect() as cluster:
        print("ready", flush=True)
        while not os.path.exists(barrier):
            await asyncio.sleep(0.005)
        results = await cluster.install(["six", "attrs"])
        jobs = await cluster.gather(lambda: __import__("six").__name__ + __import__("attrs").__name__)
    return results, jobs
results, jobs = asyncio.run(go())
print(json.dumps([[r.ok, r.value if r.ok else str(r.error), j.value] for r, j in zip(results, jobs)]))
"""


@pytest.mark.slow
def test_concurrent_installs_of_one_environment_from_two_processes(lab, workdir, tmp_path):
    inv = lab_inventory(lab, workdir)
    keys = ("name", "address", "port", "user", "identity", "known_hosts", "workdir")
    spec = json.dumps([{**{k: getattr(h, k) for k in keys}, "env": dict(h.env)} for h in inv.hosts])
    barrier = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, spec, str(barrier)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    barrier.touch()  # both controllers are connected: start the installs together
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    for i in range(10):
        a, b = outs[0][i], outs[1][i]
        assert a[0] and b[0], (a, b)
        assert a[1]["hash"] == b[1]["hash"]
        assert sorted([a[1]["cached"], b[1]["cached"]]) == [False, True]  # exactly one of them built
        assert a[2] == b[2] == "sixattrs"
        envs = host_path(lab, i, inv.hosts[i].workdir) / "envs"
        names = sorted(p.name for p in envs.iterdir() if not p.name.endswith(".lock"))
        assert [n for n in names if not n.startswith("@")] == [a[1]["hash"]]  # one environment, built once
        aliases = [envs / n for n in names if n.startswith("@")]  # the controllers' name for it, for the next start
        assert len(aliases) == 1 and os.readlink(aliases[0]) == a[1]["hash"]


@pytest.mark.slow
def test_offline_hosts_install_from_shipped_wheels(lab, workdir):
    closed = {"UV_INDEX_URL": CLOSED_INDEX, "PIP_INDEX_URL": CLOSED_INDEX}
    inv = lab_inventory(lab, workdir, env=closed, offline=True)
    events = []

    def job():
        import sys

        import markupsafe

        return str(markupsafe.escape("<b>")), sys.prefix

    async def go():
        async with inv.connect(on_event=lambda h, e, i: events.append((h, e, i))) as cluster:
            first = await cluster.install(["markupsafe"])
            ran = await cluster.gather(job)
            second = await cluster.install(["markupsafe", "six"])
            online = await cluster.install(["six", "attrs"], offline=False)
            return first, ran, second, online

    first, ran, second, online = asyncio.run(go())
    assert all(r.ok for r in first), [r.error for r in first if not r.ok]
    assert all(r.ok and r.value == ("&lt;b&gt;", f.value["env"]) for r, f in zip(ran, first)), ran
    wheels = host_path(lab, 0, inv.hosts[0].workdir) / "wheels"
    assert any(p.name.lower().startswith("markupsafe-") and "manylinux" in p.name for p in wheels.iterdir())
    assert private(wheels)
    # the second set ships only what is missing
    assert all(r.ok for r in second), [r.error for r in second if not r.ok]
    shipped = [i for h, e, i in events if e == "uploading-wheels"]
    assert shipped[:10] == [{"count": 1, "skipped": 0}] * 10
    assert shipped[10:] == [{"count": 1, "skipped": 1}] * 10
    # and the index really is unreachable from these hosts
    assert all(not r.ok and r.error.type == "InstallError" for r in online)


@pytest.mark.slow
def test_uv_from_pip_and_plain_venv_fallbacks(lab, workdir):
    inv = lab_inventory(lab, workdir).select("node01,node02")
    pip_way = run_install(inv.select("node01"), ["six"], uv="pip")
    venv_way = run_install(inv.select("node02"), ["six", "pyflakes"], uv="venv-pip")
    assert pip_way[0].ok, pip_way[0].error
    assert pip_way[0].value["uv"] == "pip"
    assert venv_way[0].ok, venv_way[0].error
    assert venv_way[0].value["uv"] == "venv-pip"
    def tool():  # a console script of the environment runs after the rename
        import subprocess
        import sys

        return subprocess.run([sys.prefix + "/bin/pyflakes", "--version"], capture_output=True, text=True).returncode

    assert inv.select("node02").gather(tool, requirements=["six", "pyflakes"])[0].value == 0


@pytest.fixture
def noexec_workdir(lab, root):
    """Host 3's workdir on a tmpfs mounted noexec (as on hardened hosts): binaries put there,
    the uploaded uv and pip's uv, cannot run; a venv's python links to the system's."""
    tag = uuid.uuid4().hex[:8]
    path = lab.home(3) / ".cache" / f"sshjobs-noexec-{tag}"
    path.mkdir(parents=True)
    user = lab.hosts[3].user
    ids = subprocess.run(["id", "-u", user], capture_output=True, text=True).stdout.strip(), \
        subprocess.run(["id", "-g", user], capture_output=True, text=True).stdout.strip()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"noexec,size=300m,mode=0700,uid={ids[0]},gid={ids[1]}",
                    "tmpfs", str(path)], check=True)
    try:
        yield f"~/.cache/{path.name}"
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_uv_fallbacks_happen_by_themselves(lab, noexec_workdir):
    """No way forced: uv is uploaded, cannot run there, pip's uv cannot either, so the
    environment is built with venv + pip, and the job runs in it."""
    host = Inventory.load(lab.inventory_path).hosts[3]
    inv = Inventory([replace(host, workdir=noexec_workdir)])
    events = []
    results = inv.install(["six"], on_event=lambda h, e, info: events.append(e))
    assert results[0].ok, results[0].error
    assert results[0].value["uv"] == "venv-pip"
    assert "uploading-uv" in events  # the upload was tried first, by itself
    assert inv.gather(lambda: __import__("six").__name__)[0].value == "six"


def run_install(inv, reqs, **kw):
    return inv.install(reqs, **kw)


@pytest.fixture
def fake_python():
    """A Python 3.11 that reports 3.9: the shape of a host whose python3 is another version."""
    d = Path(tempfile.mkdtemp(prefix="sshjobs-fakepy-", dir="/tmp"))
    (d / "sitecustomize.py").write_text("import sys\nsys.version_info = (3, 9, 18, 'final', 0)\n")
    script = d / "python3.9"
    script.write_text(f"#!/bin/sh\nPYTHONPATH={d} exec /usr/bin/python3 \"$@\"\n")
    for p in (d, script, d / "sitecustomize.py"):
        p.chmod(0o755)
    yield str(script)
    shutil.rmtree(d)


@pytest.mark.slow
def test_python_mismatch_is_reported_and_match_finds_one(lab, workdir, fake_python):
    inv = lab_inventory(lab, workdir, per_host={
        0: {"python": fake_python},
        1: {"python": "python3.0"},  # not installed
        2: {"python": "match"},
    })
    here = "%d.%d" % sys.version_info[:2]
    results = inv.install(["six"])
    assert results[0].error.type == "PythonMismatch"
    msg = results[0].error.message
    assert "3.9.18" in msg and sys.version.split()[0] in msg
    assert f'python = "python{here}"' in msg and 'python = "match"' in msg
    assert not results[1].ok and "python3.0" in results[1].error.message
    assert all(r.ok for r in results[2:]), [r.error for r in results[2:] if not r.ok]
    # python = "match": uv found the host's Python of the controller's minor version
    ran = inv.gather(lambda: __import__("sys").version_info[:2], requirements=["six"])
    assert tuple(ran[2].value) == sys.version_info[:2]


@pytest.mark.slow
def test_list_and_prune_environments(lab, workdir):
    inv = lab_inventory(lab, workdir).select("node01,node02")
    installed = inv.install(["six"])
    assert all(r.ok for r in installed)
    listed = inv.list_envs()
    for r, inst in zip(listed, installed):
        assert r.ok
        assert [(e["hash"], e["requirements"], e["complete"]) for e in r.value] == [(inst.value["hash"], ["six"], True)]
        assert time.time() - r.value[0]["last_used"] < 120
    kept = inv.prune_envs("7d")
    assert all(r.value["removed"] == [] for r in kept)
    pruned = inv.prune_envs(0)
    assert all(r.value["removed"] == [inst.value["hash"]] for r, inst in zip(pruned, installed))
    assert all(r.value == [] for r in inv.list_envs())


@pytest.mark.slow
def test_a_build_waits_for_the_hosts_lock(lab, workdir, root):
    """Another controller holding an environment's lock on a host: this one waits for it
    and then finds the environment it built (here: nobody built it, so it builds it)."""
    import fcntl
    import pwd

    inv = lab_inventory(lab, workdir).select("node01,node02")
    facts = json.loads(subprocess.run(["/usr/bin/python3", "-c", "import json,sys,os;print(json.dumps("
                                       "[sys.implementation.name,'%d.%d.%d'%sys.version_info[:3],"
                                       "os.path.realpath(sys.executable)]))"],
                                      capture_output=True, text=True, check=True).stdout)
    h = provision.env_hash(provision.python_id(*facts), ["six"], [])
    pw = pwd.getpwnam(lab.hosts[0].user)
    envs = host_path(lab, 0, inv.hosts[0].workdir) / "envs"
    envs.mkdir(parents=True, mode=0o700)
    for p in (envs.parent, envs):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    lock_path = envs / f".{h}.lock"
    with open(lock_path, "a") as lock:
        os.chown(lock_path, pw.pw_uid, pw.pw_gid)
        fcntl.flock(lock, fcntl.LOCK_EX)

        async def go():
            async with inv.connect() as cluster:
                task = asyncio.ensure_future(cluster.install(["six"]))
                await asyncio.sleep(3.0)
                waiting = not task.done()
                fcntl.flock(lock, fcntl.LOCK_UN)
                return waiting, await task

        waiting, results = asyncio.run(go())
    assert waiting  # node01's build waited for the lock
    assert all(r.ok for r in results), [r.error for r in results]
    assert results[0].value["hash"] == h and results[0].duration >= 3.0
    # node02 was not held up: it built while node01 waited (no fixed bound: under load a
    # build alone can take 3 s)
    assert results[1].duration < results[0].duration
