"""The data directory and database files are private to the server's user.

The store holds key hashes, every tenant's usage and, in the idempotency
table, whole completion texts: the directory is created 0700 and the database
0600, with no moment when either is looser (mkdir and open take the mode, and
the umask can only narrow it). SQLite gives the `-wal` and `-shm` files the
database file's mode. An existing directory that group or others can read,
write or enter is refused with the `chmod` that fixes it, never changed behind
the operator's back; database files inside a private directory that are looser
(older versions made them 0644) are narrowed to 0600, since nobody else can
reach them through the directory anyway.
"""
from __future__ import annotations

import logging
import os
import shlex
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600
_OTHERS = 0o077  # any group or other permission bit
DB_SIDE_FILES = ("-wal", "-shm", "-journal")  # SQLite's companions of the database file

log = logging.getLogger("lockgate.store")


class UnsafeDataDir(PermissionError):
    """The data directory is open to group or others; the message says how to fix it."""


def private_dir(path: str | os.PathLike[str]) -> Path:
    """`path` as a data directory: created 0700 if missing (parents as the umask says), else checked."""
    d = Path(path)
    try:
        d.mkdir(mode=DIR_MODE, parents=True)
    except FileExistsError:
        pass
    else:
        os.chmod(d, DIR_MODE)  # an unusual umask (0o277) may have taken the owner's own bits too
    check_private_dir(d)
    return d


def check_private_dir(path: str | os.PathLike[str]) -> None:
    """Refuse a data directory that group or others can read, write or enter (UnsafeDataDir)."""
    d = Path(path)
    st = os.stat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise NotADirectoryError(f"{d} exists and is not a directory")
    mode = stat.S_IMODE(st.st_mode)
    if mode & _OTHERS:
        raise UnsafeDataDir(
            f"refusing to use data directory {d}: its mode is {mode:04o}, so group or others can reach the "
            f"database (API key hashes, every tenant's usage, stored completions). Make it private with: "
            f"chmod 700 {shlex.quote(str(d))}")


def private_db_file(path: str | os.PathLike[str]) -> None:
    """Before SQLite opens `path`: its directory is private, and the file and its companions are 0600.

    A missing database is created empty (SQLite takes an empty file as a new database) with mode
    0600, so SQLite never creates it with its default 0644.
    """
    db = Path(path)
    check_private_dir(db.parent)
    try:
        fd = os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), FILE_MODE)
    except FileExistsError:
        pass
    else:
        os.close(fd)
    for f in (db, *(db.with_name(db.name + s) for s in DB_SIDE_FILES)):
        try:
            mode = stat.S_IMODE(os.stat(f).st_mode)
        except FileNotFoundError:
            continue
        if mode & _OTHERS:
            os.chmod(f, mode & ~_OTHERS)
            log.warning("%s had mode %04o; narrowed to %04o (only the server's user may read it)",
                        f, mode, mode & ~_OTHERS)
