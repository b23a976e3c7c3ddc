"""The files sshjobs keeps on a host, all under its workdir: private folders, private
files written whole, the compiled-code cache the STUB reads (see sshjobs.remote), removal.

Stdlib only; runs on the hosts, in workers and in provisioning (and on the controller,
as sshjobs.remote.files, for its own private files).
"""

import os
import sys

ENV_MARKER = "sshjobs-env.json"  # in an environment's folder: present only once it is complete


def read_stdin():
    """All of stdin, to its end: a bundle's one request."""
    chunks = []
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def touch_env():
    """Mark this interpreter's environment used now (prune keeps environments in use), when
    it runs in one of sshjobs' (a worker started by an environment's alias)."""
    if sys.prefix != getattr(sys, "base_prefix", sys.prefix):
        try:
            os.utime(os.path.join(sys.prefix, ENV_MARKER))
        except OSError:
            pass


def save_code():
    """Write the bundle's compiled code where the next STUB looks for it: the STUB left
    (path, code) on the package module when it had to compile."""
    cache = getattr(sys.modules.get(__package__), "CODE_CACHE", None)
    if not cache or not isinstance(cache, tuple):
        return
    path, code = cache
    try:
        import marshal

        write_private(path, marshal.dumps(code))
    except Exception:
        pass  # no cache (a read-only home, say): the next start compiles again


def write_private(path, data):
    """Write ``data`` to ``path`` whole: a 0600 file renamed into place, in a folder made
    0700 when it is missing (its missing parents get the umask's mode).  Raises OSError."""
    folder = os.path.dirname(path)
    if folder and not os.path.isdir(folder):
        os.makedirs(folder, 0o700)
    tmp = "%s.tmp-%d" % (path, os.getpid())
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileExistsError:  # left by a process of the same pid that died before its rename
        remove(tmp)
        fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def private_dir(path):
    """Create the workdir (parents as needed) and keep it mode 0700: everything sshjobs
    puts on a host lives below it, out of other users' reach."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        if os.stat(path).st_mode & 0o777 != 0o700:
            os.chmod(path, 0o700)
    except OSError:
        pass  # a read-only home: nothing is written (cloudpickle is loaded from memory)


def rmtree(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def remove(path):
    """Remove a file or a folder tree, if it is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        rmtree(path)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass
