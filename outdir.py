"""What train.py keeps in out_dir, and how: one run per folder, nothing ever half-written.

An out_dir belongs to one run. `claim` locks it for the run's life (a second run
into it stops at once), refuses a folder holding another run's files unless
--resume or --overwrite says what to do with them, and removes the temporary
files of writers that were killed mid-save. Every file is written to
`<name>.tmp<pid>` and renamed (`atomic_write`), so a reader, or a run resumed
after a crash, sees the old file or the new one; a write that fails (no space, a size
limit) is reported as the OSError it is, with the file's path.
"""
import fcntl
import json
import os
import re

import torch

RUN_FILES = ("ckpt.pt", "best.pt", "log.jsonl")


class RunError(Exception):
    """A run that cannot start or go on; the message says what to do."""


def claim(out_dir, resume, overwrite):
    """Lock out_dir for as long as the returned file stays open, and make it ready for this run."""
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel drops it when the process dies, even on kill -9
    except BlockingIOError:
        lock.seek(0)
        raise RunError(f"another run (pid {lock.read().strip() or '?'}) is writing to {out_dir}: "
                       f"wait for it to finish, or choose another --out_dir") from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    for name in os.listdir(out_dir):  # what writers killed mid-save left behind
        m = re.fullmatch(r"(ckpt\.pt|best\.pt|log\.jsonl|features-\w+\.npy)\.tmp(\d+)(\.npy)?", name)
        if m and not alive(int(m.group(2))):
            os.remove(os.path.join(out_dir, name))
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f))]
    if found and not (resume or overwrite):
        raise RunError(f"{out_dir} holds another run ({', '.join(found)}): continue it with --resume, "
                       f"replace it with --overwrite, or choose another --out_dir")
    for f in found if overwrite else []:
        os.remove(os.path.join(out_dir, f))
    return lock


def alive(pid):
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no pid is that large
        return False
    except PermissionError:  # another user's process
        pass
    return True


def atomic_write(path, write):
    """write(f) into path.tmp<pid>, then rename it to path. On any failure no temporary file is
    left, and a failed write (no space, a size limit) is an OSError naming path, even where torch
    or numpy report it otherwise ("[enforce fail at inline_container.cc]", "n requested and m written")."""
    tmp, out = f"{path}.tmp{os.getpid()}", None
    try:
        with open(tmp, "wb") as f:
            out = _Writes(f)
            write(out)
        os.replace(tmp, path)
    except Exception as e:
        error = out.error if out and out.error else e
        if isinstance(error, OSError) and error.filename is None:
            raise OSError(error.errno, error.strerror, path) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _Writes:
    """A file that keeps the OSError of a failed write, which torch and numpy replace by their own words."""

    def __init__(self, f):
        self.f, self.flush, self.error = f, f.flush, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise


def save(obj, path):
    """torch.save, atomically (a crash never leaves half a checkpoint)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def log_writer(path, step):
    """log(entry): one JSON line appended to log.jsonl. A resumed run (from step) keeps the lines
    before step: read now, so a damaged log stops the run before it starts, and written back,
    atomically, with the first new entry, so a run that stops before it leaves the log as it was."""
    kept = read_log(path, step)

    def log(entry):
        nonlocal kept
        if kept is not None:
            atomic_write(path, lambda f: f.write(b"".join(kept)))
            kept = None
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
    return log


def read_log(path, step):
    """The lines of log.jsonl from before step: what a resumed run keeps (log_writer writes them back
    atomically with its first entry). A half last line (a kill mid-write) is dropped; anything else
    that is not a log entry is an error naming its line, and the file stays as it is."""
    kept = []
    if os.path.exists(path):
        with open(path, "rb") as f:
            *lines, _half = f.read().split(b"\n")  # _half: after the last newline, b"" unless cut short
        for i, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                ok = isinstance(entry, dict) and type(entry.get("step")) is int
            except ValueError:
                ok = False
            if not ok:
                raise RunError(f"{path} line {i} is not a log entry ({line[:40]!r}): remove that line "
                               f"and --resume again")
            if entry["step"] < step:
                kept.append(line + b"\n")
    return kept
