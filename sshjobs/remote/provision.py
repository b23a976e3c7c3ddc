"""The host side of provisioning: environments under ``<workdir>/envs``, built with uv.

``python3 -c STUB`` runs this bundle's ``main()``: one JSON request on the rest of stdin,
one JSON reply on stdout (see sshjobs.provisioning, the controller's half).  Workers never
get this module.

Stdlib only, and no syntax newer than the oldest host Python that must still be able to
say which Python it is.
"""

import json
import os
import sys
import time

from .files import ENV_MARKER, read_stdin, remove, rmtree, save_code
from .protocol import error_info, index_env

ENV_REQUIREMENTS = "sshjobs-requirements.txt"
ERROR_TAIL = 2000  # characters of uv's (or pip's) message kept
# uv verifies TLS with roots of its own, not the host's: behind a TLS-inspecting proxy whose CA
# is only in the host's store, every download fails ("invalid peer certificate: UnknownIssuer").
# So uv is told to use the system store, unless the host's env already says either way. uv
# 0.11 renamed the setting UV_SYSTEM_CERTS and later warns about UV_NATIVE_TLS, which older
# uv needs.
UV_TLS_SETTINGS = ("UV_SYSTEM_CERTS", "UV_NATIVE_TLS")
CERT_HINT = ("\nThe package index's TLS certificate could not be verified%s. If this host reaches it through a "
             "TLS-inspecting proxy, give it the proxy's CA bundle in the inventory's env, e.g. "
             "env = { SSL_CERT_FILE = \"/path/to/ca-bundle.crt\" } (pip also reads PIP_CERT).")


class ProvisionFailure(Exception):
    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message


def env_hash(python_id, requirements, options):
    """An environment's id: (interpreter, sorted requirement set, index options)."""
    import hashlib

    blob = json.dumps({"python": python_id, "requirements": sorted(set(requirements)),
                       "options": list(options)}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def python_id(implementation, version, realpath):
    return "%s-%s %s" % (implementation, version, realpath)


def python_facts(full=False):
    exe = os.path.realpath(sys.executable)
    version = "%d.%d.%d" % sys.version_info[:3]
    facts = {"version": version, "executable": exe, "id": python_id(sys.implementation.name, version, exe)}
    if full:
        try:
            libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
        except (AttributeError, ValueError, OSError):
            libc = ""
        if not libc:
            import platform

            name, ver = platform.libc_ver()
            libc = ("%s %s" % (name, ver)).strip()
        facts.update(implementation=sys.implementation.name, cache_tag=sys.implementation.cache_tag,
                     platform=sys.platform, machine=os.uname().machine, libc=libc)
    return facts


def _complete(target):
    marker = os.path.join(target, ENV_MARKER)
    try:
        os.utime(marker)  # last use, for prune
        return True
    except OSError:
        return False


def link_alias(envs, alias, name):
    """``envs/@ALIAS`` -> NAME, replaced whole: the controller's name for an environment,
    which workers' start commands try (see sshjobs.provisioning.EnvSpec.alias)."""
    if not alias or not all(c in "0123456789abcdef" for c in alias):
        return
    link = os.path.join(envs, "@" + alias)
    tmp = "%s.tmp-%d" % (link, os.getpid())
    try:
        os.symlink(name, tmp)
        os.rename(tmp, link)
    except OSError:
        remove(tmp)


def _trim(text):
    text = text.strip()
    return text if len(text) <= ERROR_TAIL else "..." + text[-ERROR_TAIL:]


def cert_error(text):
    """The output of uv or pip says a TLS certificate could not be verified."""
    text = text.lower()
    return "invalid peer certificate" in text or "certificate verify failed" in text


def _run(cmd, what, env=None, tried=""):
    """Run cmd (with env added to this process's environment); its output, or a
    ProvisionFailure with its tail (and what to set when a certificate was refused)."""
    import subprocess

    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=dict(os.environ, **env) if env else None)
    except OSError as exc:
        raise ProvisionFailure("InstallError", "%s: cannot run %s: %s" % (what, cmd[0], exc))
    out = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0:
        hint = CERT_HINT % tried if cert_error(out) else ""
        raise ProvisionFailure("InstallError", "%s failed (exit status %d):\n%s%s"
                               % (what, proc.returncode, _trim(out), hint))
    return out


_UV_VERSIONS = {}  # path -> `uv --version` output, asked once per process


def _uv_works(path):
    import subprocess

    if path not in _UV_VERSIONS:
        try:
            proc = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT)
        except OSError:
            return None
        if proc.returncode != 0:
            return None
        _UV_VERSIONS[path] = proc.stdout.decode("utf-8", "replace").strip()
    return _UV_VERSIONS[path]


def uv_tls_env(version, environ=None):
    """The variables that make a uv of this ``uv --version`` output trust the host's system
    certificate store; {} when the environment already sets one of UV_TLS_SETTINGS."""
    environ = os.environ if environ is None else environ
    if any(k in environ for k in UV_TLS_SETTINGS):
        return {}
    try:
        release = tuple(int(part) for part in version.split()[1].split(".")[:2])
    except (AttributeError, IndexError, ValueError):
        return {"UV_SYSTEM_CERTS": "1", "UV_NATIVE_TLS": "1"}  # unknown: each uv reads the one it knows
    return {"UV_SYSTEM_CERTS": "1"} if release >= (0, 11) else {"UV_NATIVE_TLS": "1"}


def _uv_install(cmd, tls):
    """``uv pip install`` trusting the system store (tls: its variables, {} when the env
    decides). A certificate refused that way is tried once more with uv's own roots: a host
    with no usable store of its own can still reach a public index."""
    tried = (" with this host's certificate store (%s) nor with uv's own roots"
             % " ".join("%s=%s" % kv for kv in sorted(tls.items()))) if tls else ""
    try:
        return _run(cmd, "uv pip install", tls, tried)
    except ProvisionFailure as exc:
        if not tls or not cert_error(exc.message):
            raise
        first = exc  # the one to report when uv's own roots fail too
    try:
        return _run(cmd, "uv pip install (with uv's own root certificates)")
    except ProvisionFailure as exc:
        if not cert_error(exc.message):
            raise
    raise first


def find_uv(workdir, methods=("path", "workdir")):
    """(how, path) of a working uv on this host, or (None, None)."""
    import shutil

    for how in methods:
        if how == "path":
            cands = [shutil.which("uv"), os.path.expanduser("~/.local/bin/uv"), os.path.expanduser("~/.cargo/bin/uv")]
        elif how == "workdir":
            cands = [os.path.join(workdir, "bin", "uv")]
        else:
            continue
        for path in cands:
            if path and os.path.isfile(path) and os.access(path, os.X_OK) and _uv_works(path):
                return how, path
    return None, None


def _pip_uv(workdir, find_links):
    """``python3 -m pip install uv`` into the workdir (--target: allowed where PEP 668
    forbids --user installs); the binary is then linked as <workdir>/bin/uv."""
    target = os.path.join(workdir, "uv-pip")
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet",
           "--upgrade", "--target", target, "uv"]
    if find_links:
        cmd[4:4] = ["--no-index", "--find-links", find_links]
    _run(cmd, "pip install uv")
    path = os.path.join(target, "bin", "uv")
    if not _uv_works(path):
        raise ProvisionFailure("InstallError", "pip installed uv but %s does not run" % path)
    link = os.path.join(workdir, "bin", "uv")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    tmp = "%s.tmp-%d" % (link, os.getpid())
    os.symlink(path, tmp)
    os.rename(tmp, link)
    return path


def _get_uv(workdir, methods, find_links):
    """(how, uv path or None for plain pip) following the controller's order of methods."""
    errors = []
    for how in methods:
        if how in ("path", "workdir"):
            found, path = find_uv(workdir, (how,))
            if path:
                return found, path
        elif how == "pip":
            try:
                return "pip", _pip_uv(workdir, find_links)
            except ProvisionFailure as exc:
                errors.append(exc.message)
        elif how == "venv-pip":
            return "venv-pip", None
    raise ProvisionFailure("UvUnavailable", "no uv on the host and no way to get one (tried %s)%s"
                           % (", ".join(methods), (":\n" + "\n".join(errors)) if errors else ""))


def _retarget(tmp, target):
    """A venv made by ``python -m venv`` names its folder in scripts and activate files:
    point them at where it is renamed to (uv's --relocatable venvs need none of this)."""
    old, new = tmp.encode(), target.encode()
    bindir = os.path.join(tmp, "bin")
    for name in os.listdir(bindir):
        path = os.path.join(bindir, name)
        if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) > (1 << 20):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if old in data:
            with open(path, "wb") as f:
                f.write(data.replace(old, new))


def _build(tmp, req, workdir, facts, reqfile, target):
    find_links = os.path.join(workdir, "wheels") if req.get("offline") else None
    how, uv = _get_uv(workdir, req.get("uv_methods", ["path", "workdir", "pip", "venv-pip"]), find_links)
    if uv:
        tls = uv_tls_env(_uv_works(uv))
        try:
            _run([uv, "venv", "--quiet", "--relocatable", "--python", facts["executable"], tmp], "uv venv", tls)
        except ProvisionFailure as exc:
            if "--relocatable" not in exc.message:  # an old uv: an ordinary venv
                raise
            _run([uv, "venv", "--quiet", "--python", facts["executable"], tmp], "uv venv", tls)
        # --compile-bytecode: at install, as pip does, not at the first jobs' imports on every host
        cmd = [uv, "pip", "install", "--quiet", "--compile-bytecode", "--python", os.path.join(tmp, "bin", "python"),
               "-r", reqfile]
        if find_links:
            cmd += ["--offline", "--no-index", "--find-links", find_links]
            _run(cmd, "uv pip install", tls)
        else:
            _uv_install(cmd, tls)
    else:  # pip reads its own configuration (pip.conf's cert, PIP_CERT)
        _run([facts["executable"], "-m", "venv", tmp], "python -m venv")
        cmd = [os.path.join(tmp, "bin", "python"), "-m", "pip", "install", "--disable-pip-version-check",
               "--quiet", "-r", reqfile]
        if find_links:
            cmd += ["--no-index", "--find-links", find_links]
        _run(cmd, "pip install")
        _retarget(tmp, target)
    return how, uv


def _list_envs(envs):
    out = []
    try:
        names = sorted(os.listdir(envs))
    except OSError:
        return out
    for name in names:
        path = os.path.join(envs, name)
        if name.startswith((".", "@")) or not os.path.isdir(path):
            continue
        info = {"hash": name, "env": path, "complete": False}
        marker = os.path.join(path, ENV_MARKER)
        try:
            with open(marker) as f:
                info.update(json.load(f))
            info["last_used"] = os.stat(marker).st_mtime
            info["complete"] = True
        except (OSError, ValueError):
            pass
        out.append(info)
    return out


def _prune(envs, older_than):
    import fcntl

    removed, kept = [], []
    now = time.time()
    try:
        names = sorted(os.listdir(envs))
    except OSError:
        return {"removed": removed, "kept": kept}
    for name in names:
        path = os.path.join(envs, name)
        if name.startswith(".del-"):  # an interrupted prune
            remove(path)
            continue
        if name.endswith(".lock") or name.startswith("@") or not (os.path.isdir(path) or name.startswith(".tmp-")):
            continue  # lock files stay: removing one under a waiting builder would break the lock
        h = name[len(".tmp-"):].split("-")[0] if name.startswith(".tmp-") else name
        if not name.startswith("."):
            try:
                age = now - os.stat(os.path.join(path, ENV_MARKER)).st_mtime
            except OSError:
                age = float("inf")  # incomplete: never usable
            if age < older_than:
                kept.append(name)
                continue
        with open(os.path.join(envs, "." + h + ".lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # being built or checked right now
                kept.append(name)
                continue
            gone = os.path.join(envs, ".del-%s-%d" % (name.lstrip("."), os.getpid()))
            os.rename(path, gone)
            remove(gone)
            removed.append(name)
    for name in names:
        path = os.path.join(envs, name)
        if name.startswith("@") and os.path.islink(path) and not os.path.exists(path):
            remove(path)
    return {"removed": removed, "kept": kept}


def provision_request(req):
    """One provisioning request (a dict) -> reply (a dict); see sshjobs.provisioning."""
    import fcntl
    import glob

    os.umask(0o077)  # everything sshjobs creates under the workdir is the user's alone
    workdir = os.path.abspath(os.path.expanduser(req["workdir"]))
    envs = os.path.join(workdir, "envs")
    op = req["op"]
    if op == "list":
        return {"ok": True, "workdir": workdir, "envs": _list_envs(envs)}
    if op == "prune":
        return dict(_prune(envs, float(req["older_than"])), ok=True, workdir=workdir)
    if op == "find-python":
        how, uv = find_uv(workdir, [m for m in req.get("uv_methods", ()) if m in ("path", "workdir")])
        if not uv and "pip" in req.get("uv_methods", ()):
            how, uv = "pip", _pip_uv(workdir, None)
        if not uv:
            os.makedirs(os.path.join(workdir, "bin"), exist_ok=True)  # for an upload
            return {"ok": True, "uv": None, "facts": python_facts(True), "workdir": workdir}
        out = _run([uv, "python", "find", "--system", req["version"]], "uv python find " + req["version"],
                   uv_tls_env(_uv_works(uv))).strip()
        return {"ok": True, "uv": how, "python": out.splitlines()[-1].strip(), "workdir": workdir}
    facts = python_facts(full=op == "check")
    h = env_hash(facts["id"], req["requirements"], list(req.get("options", ())) + index_env())
    target = os.path.join(envs, h)
    reply = {"ok": True, "hash": h, "env": target, "python": os.path.join(target, "bin", "python"),
             "workdir": workdir, "version": facts["version"], "cached": True}
    if _complete(target):
        link_alias(envs, req.get("alias"), h)
        return reply
    reply["cached"] = False
    if op == "check":
        for sub in ("envs", "bin", "wheels"):
            os.makedirs(os.path.join(workdir, sub), exist_ok=True)
        how, uv = find_uv(workdir)
        reply.update(facts=facts, uv=how, uv_path=uv)
        if req.get("offline"):
            wheels = os.path.join(workdir, "wheels")
            reply["wheels"] = {n: os.path.getsize(os.path.join(wheels, n)) for n in os.listdir(wheels)
                               if not n.startswith(".")}
        return reply
    if op != "build":
        raise ProvisionFailure("ProtocolError", "unknown request %r" % op)
    os.makedirs(envs, exist_ok=True)
    os.chdir(workdir)  # not the home folder: uv would read a pyproject.toml it finds there
    with open(os.path.join(envs, "." + h + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another controller building the same env: wait for it
        if _complete(target):
            link_alias(envs, req.get("alias"), h)
            reply["cached"] = True
            return reply
        for stale in glob.glob(os.path.join(envs, ".tmp-%s-*" % h)):
            remove(stale)  # an interrupted build: we hold the lock, so nobody owns it
        if os.path.isdir(target):
            rmtree(target)
        tmp = os.path.join(envs, ".tmp-%s-%d" % (h, os.getpid()))
        reqfile = tmp + ".txt"
        with open(reqfile, "w") as f:
            f.write("".join(line + "\n" for line in list(req.get("options", ())) + list(req["requirements"])))
        try:
            how, uv = _build(tmp, req, workdir, facts, reqfile, target)
            os.rename(reqfile, os.path.join(tmp, ENV_REQUIREMENTS))
            with open(os.path.join(tmp, ENV_MARKER), "w") as f:
                json.dump({"hash": h, "requirements": req["requirements"], "options": req.get("options", []),
                           "python": facts["id"], "created": time.time(), "uv": how}, f)
            os.rename(tmp, target)  # complete: from now on others use it
            link_alias(envs, req.get("alias"), h)
        except BaseException:
            rmtree(tmp)
            raise
        finally:
            if os.path.exists(reqfile):
                os.unlink(reqfile)
    reply["uv"] = how
    return reply


def main():
    """Entry point of the provisioning bundle: one request on stdin, one reply on stdout."""
    try:
        request = json.loads(read_stdin().decode("utf-8"))
        os.environ.update(request.pop("env", None) or {})  # the inventory's env (off the command line)
        reply = provision_request(request)
    except ProvisionFailure as exc:
        reply = {"ok": False, "kind": exc.kind, "error": exc.message}
    except BaseException as exc:
        info = error_info(exc)
        reply = {"ok": False, "kind": "InstallError", "error": "%s: %s" % info[:2], "traceback": info[2]}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    save_code()  # after the reply: the controller need not wait for it
