"""One pipeline command at a time writes a run folder: an advisory lock on RUN/run.lock.

Without it, a recipe started twice on one folder (a second terminal, a cluster job resubmitted while the
first still runs) has two processes write the same stage's checkpoints, and the second "resumes" from the
first's half-written ones. flock is released by the kernel when its holder dies, so a crash or a kill -9
never leaves the folder locked; on NFS, Linux turns it into a lock the server keeps, so it also holds between
the nodes of a cluster. The lock file's text says who holds it, for the refusal's message.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError

LOCK_FILE = "run.lock"
# a file system without locks (some FUSE mounts): the command goes on unguarded, and says so
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def _holder(path: Path) -> str:
    """Who holds the lock, from what its holder wrote: 'pid 123 on h since 2026-12-01 22:40:00: pipeline run x'."""
    try:
        info = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']} since {since}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its process did not say which"  # it has the lock but has not written this yet


def try_lock(run_dir: Path, advice: str = "") -> tuple[int | None, str | None]:
    """(fd holding the lock, None), or (None, why the folder is taken, ending in `advice`). A file system without
    locks: (None, None)."""
    path = run_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return None, None  # a folder this user cannot write (eval --out elsewhere): no run of theirs writes it
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None, f"{run_dir} is in use by another pipeline command ({_holder(path)}); wait for it to finish{advice}"
    except OSError as exc:
        os.close(fd)
        if exc.errno in NO_LOCKS:
            print(f"note: {run_dir}'s file system has no file locks; nothing stops a second command from writing "
                  "this folder at the same time", flush=True)
            return None, None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                             "command": " ".join(["pipeline", *sys.argv[1:]])}).encode())
    return fd, None


@contextmanager
def run_folder_lock(run_dir: Path, accelerator=None, advice: str = ""):
    """Hold the run folder's lock for the body. With several processes the main one locks and tells the others
    (one launch is one holder); every process raises the same PipelineError when another command has it."""
    main = accelerator is None or accelerator.is_main_process
    fd, taken = None, None
    if main:
        try:
            fd, taken = try_lock(run_dir, advice)
        except OSError as exc:  # said to every process below: a raise here would leave the others waiting for it
            taken = f"cannot lock {run_dir}: {exc.strerror}"
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        taken = broadcast_object_list([taken], from_process=0)[0]
    if taken:
        raise PipelineError(taken)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock; the file stays (removing it could race a new holder's open)
