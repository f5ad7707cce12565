"""Run files on local disks or object stores: workdirs and written files as ``etils.epath`` paths.

A path that is a URL (``gs://bucket/run``, any scheme ``etils.epath`` reads) is used as it is; a
local path is made absolute, as ``os.path.abspath`` does. Nothing here turns a URL into a local
path (``os.path.abspath("gs://b/run")`` would be ``<cwd>/gs:/b/run``).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO

from etils import epath


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """``workdir`` as an ``epath.Path``: a URL as it is, a local path made absolute."""
    path = os.fspath(workdir)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Calls ``write(binary_file)`` on a temporary file beside ``path``, then renames it to
    ``path`` (parent directories are created), so a reader never sees a partial file."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as f:
        write(f)
    tmp.replace(path)
