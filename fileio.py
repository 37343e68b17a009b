"""
Chapter: writing files so that nothing is ever half-written or lost.

Every output of this project (a checkpoint folder, a dataset, a filter result, a json report) is written
to a temporary name beside its destination and renamed into place only when complete: a rename within one
file system is atomic, so a killed process leaves either the old output or the new one, never a mix.
Temporaries carry the writer's PID (`<dst>.tmp<PID>`), so the next writer can remove those of dead
processes instead of leaving gigabytes behind.

One rule decides where an output may go, the same for every script and for save_pretrained
(`check_output_file`, `check_output_dir`): an existing file never becomes a folder; an existing folder is
replaced only with --overwrite and only if it holds nothing but what that writer writes (a model, a dataset,
a filter result); and no output is, lies inside, or contains an input.
"""
import contextlib
import fnmatch
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
            if ".old" in cand[m.start():] and not os.path.isdir(cand):
                continue  # a parked file is someone's original, never a leftover of ours: leave it
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
    """Move a finished folder into place; the old one is removed only once the new one is there, and is put
    back if the new one cannot be moved in."""
    old = f"{path}.old{os.getpid()}"
    parked = os.path.exists(path)
    if parked:
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if parked:
            os.replace(old, path)
        raise
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


def _overlap(path, inputs):
    """The first (flag, input) that `path` is, lies inside, or contains."""
    for flag, inp in inputs:
        if inp and os.path.exists(inp) and (is_inside(path, inp) or is_inside(inp, path)):
            return flag, inp
    return None


def check_output_file(path, flag, inputs=()):
    """A file output (a report, a .gguf): not a folder, not an input nor inside one, in a writable folder.
    inputs: (flag, path) pairs. Raises ValueError with the one-line reason (scripts turn it into UserError)."""
    if os.path.isdir(path):
        raise ValueError(f"{flag}={path} is a folder: pass a file path, e.g. {os.path.join(path, 'out.json')}")
    hit = _overlap(path, inputs)
    if hit:
        raise ValueError(f"{flag}={path} is or lies inside the input {hit[0]}={hit[1]}, which is never written "
                         f"to: pick another path")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag}={path}: cannot create its folder ({e.strerror}): pick another path") from None
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag}={path} is not writable: pick another path or fix the permissions")


def check_output_dir(path, flag, kind, holds, overwrite, inputs=()):
    """A folder output replaced as a whole. `kind` names what it is ("a model"), `holds` the file-name
    patterns such a folder consists of, inputs (flag, path) pairs. Raises ValueError with the reason."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag}={path} is a file, and an existing file is never turned into a folder: pass a "
                         f"new folder path")
    hit = _overlap(path, inputs)
    if hit:
        raise ValueError(f"{flag}={path} is, lies inside or contains the input {hit[0]}={hit[1]}, which is never "
                         f"written to or deleted: pick another {flag}")
    names = os.listdir(path) if os.path.isdir(path) else []
    if not names:
        return
    others = [n for n in sorted(names) if not any(fnmatch.fnmatch(n, p) for p in holds) and not _TMP_RE.search(n)]
    if others:
        raise ValueError(f"{flag}={path} holds files that are not {kind} ({', '.join(others[:3])}"
                         f"{' ...' if len(others) > 3 else ''}); it would be replaced as a whole: pick a new folder")
    if not overwrite:
        raise ValueError(f"{flag}={path} exists: pass --overwrite=True to replace it, or pick a new folder")
