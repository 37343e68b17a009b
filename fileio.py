"""
Chapter: writing files so that nothing is ever half-written or lost.

Every output of this project (a checkpoint folder, a dataset, a filter result, a json report) is written
to a temporary name beside its destination and renamed into place only when complete: a rename within one
file system is atomic, so a killed process leaves either the old output or the new one, never a mix.
Temporaries carry the writer's PID (`<dst>.tmp<PID>`), so the next writer can remove those of dead
processes instead of leaving gigabytes behind.
"""
import contextlib
import hashlib
import glob
import os
import re
import shutil

_TMP_RE = re.compile(r"\.(?:tmp|old)(\d+)$")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fix_mode(path):
    """Files we create get the usual 0666 & ~umask (tempfile and some writers use 0600)."""
    os.chmod(path, 0o666 & ~_umask())


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(path):
    """Remove `<path>.tmp<PID>` / `<path>.old<PID>` left by processes that no longer run. A writer killed
    between the two renames of replace_dir leaves no `path` but a complete `<path>.old<PID>`: that one is
    put back instead, so the old output is never lost."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        for old in sorted(glob.glob(glob.escape(path) + ".old*")):
            m = _TMP_RE.search(old)
            if m and old[:m.start()] == path and not pid_alive(int(m.group(1))):
                os.replace(old, path)
                break
    for cand in glob.glob(glob.escape(path) + ".tmp*") + glob.glob(glob.escape(path) + ".old*"):
        m = _TMP_RE.search(cand)
        if m and cand[:m.start()] == path and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            if os.path.isdir(cand) and not os.path.islink(cand):
                shutil.rmtree(cand, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(cand)


def fsync_tree(path):
    """Flush every file under `path` (and the folders) to disk before the rename that publishes them."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def atomic_file(path, mode="w", **kw):
    """`with atomic_file(p) as f: f.write(...)`: `p` appears only if the block finishes."""
    path = os.path.abspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _fix_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write(path, data):
    """Write bytes or text to `path` atomically (temporary file, fsync, rename)."""
    binary = isinstance(data, (bytes, bytearray))
    with atomic_file(path, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
        f.write(data)


def replace_dir(tmp, path):
    """Move a finished folder into place; the old one is removed only once the new one is there."""
    old = f"{path}.old{os.getpid()}"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path):
    """`with atomic_dir(dst) as tmp:` write the folder's files into `tmp`; on success `tmp` replaces `dst`
    (the old `dst` is deleted only after the new one is in place); on any error `dst` is untouched."""
    path = os.path.abspath(path)
    clean_stale_temporaries(path)
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                _fix_mode(os.path.join(root, name))
        fsync_tree(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_inside(path, folder):
    """True if `path` is `folder` or lies under it (after resolving symlinks): never delete what you read."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)
