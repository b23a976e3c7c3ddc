"""The host's side of ``sync``: which files of a folder differ from the controller's copy
by content (sha256), the folders they go into, and (``delete``) the removal of what the
controller's copy does not have.  The files themselves then travel over SFTP.

``python3 -c STUB`` runs this bundle's ``main()``: one JSON request on the rest of stdin,
one JSON reply line on stdout.  Stdlib only; runs on the hosts.

Request: ``root`` (the folder; relative to the home directory), ``files`` ({relative
POSIX path: [size, sha256 hex]}), ``dirs`` (every folder of the controller's copy, relative),
``delete``.  Reply: ``ok``, ``root`` (absolute), ``send`` (the relative paths to copy),
``unchanged`` (how many are there already), ``deleted`` (the relative paths removed); or
``ok`` false with ``error``.
"""

import errno
import hashlib
import json
import os
import shutil
import stat
import sys

from .files import read_stdin, save_code

CHUNK = 1 << 20


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _lstat(path):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _remove(path, st):
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def plan(request):
    root = os.path.expanduser(request["root"])
    files = request["files"]
    dirs = set(request["dirs"])
    delete = bool(request.get("delete"))
    os.makedirs(root, exist_ok=True)
    deleted = []
    # Folders first, parents before children: a file of the controller's copy where the
    # host has a folder, or the reverse, is replaced only with ``delete``.
    for rel in sorted(dirs, key=lambda d: d.count("/")):
        path = os.path.join(root, rel)
        st = _lstat(path)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            if not delete:
                raise OSError(errno.ENOTDIR, "not a folder on the host (delete=True replaces it)", path)
            _remove(path, st)
            deleted.append(rel)
            st = None
        if st is None:
            os.mkdir(path)
    send = []
    unchanged = 0
    for rel, (size, sha) in files.items():
        path = os.path.join(root, rel)
        st = _lstat(path)
        if st is None:
            send.append(rel)
        elif stat.S_ISDIR(st.st_mode):
            if not delete:
                raise OSError(errno.EISDIR, "a folder on the host (delete=True replaces it)", path)
            _remove(path, st)
            deleted.append(rel)
            send.append(rel)
        elif stat.S_ISREG(st.st_mode) and st.st_size == size and digest(path) == sha:
            unchanged += 1
        else:
            send.append(rel)  # its content differs (or a link): replaced by a rename over it
    if delete:
        deleted += _extra(root, files, dirs)
    return {"ok": True, "root": os.path.abspath(root), "send": send, "unchanged": unchanged, "deleted": deleted}


def _extra(root, files, dirs):
    """Remove what the controller's copy does not have, deepest first; links are removed,
    never followed."""
    gone = []
    for top, subdirs, names in os.walk(root, topdown=False):
        rel_top = os.path.relpath(top, root).replace(os.sep, "/")
        prefix = "" if rel_top == "." else rel_top + "/"
        for name in names:
            rel = prefix + name
            if rel not in files:
                os.unlink(os.path.join(top, name))
                gone.append(rel)
        for name in subdirs:
            rel = prefix + name
            if rel not in dirs:
                path = os.path.join(top, name)
                if os.path.islink(path):
                    os.unlink(path)
                else:
                    os.rmdir(path)  # emptied above (walked bottom-up)
                gone.append(rel)
    return gone


def describe(exc):
    """One line for an OSError, naming the path, as the controller shows it."""
    if isinstance(exc, OSError):
        why = {errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.ENOSPC: "no space left on"
               " the host's disk", errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded"}
        reason = why.get(exc.errno) or exc.strerror or str(exc)
        return "%s: %s" % (exc.filename, reason) if exc.filename else reason
    return "%s: %s" % (type(exc).__name__, exc)


def main():
    """Entry point of the tree bundle: one request on stdin, one reply on stdout."""
    try:
        reply = plan(json.loads(read_stdin().decode("utf-8", "surrogateescape")))
    except BaseException as exc:
        reply = {"ok": False, "error": describe(exc)}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    save_code()  # after the reply: the controller need not wait for it
