"""Run folders and checkpoints: every run gets its own version folder, resuming is explicit, writes are atomic.

    runs/quickstart/                 trainer.default_root_dir (the config's, or --trainer.default_root_dir)
        version_0/                   one folder per `biozoo fit|validate|test|predict` invocation
            checkpoints/last.ckpt    + the best by the monitored metric, + on_exception.ckpt after a crash
            metrics.csv  config.yaml  hparams.yaml  learning_curve.png  tensorboard/  wandb/
        version_1/ ...

`--ckpt_path last` means the newest `last.ckpt` / `on_exception.ckpt` of any earlier version under the same
root; the resumed run still writes into a new version folder, so no run's files are ever overwritten.
Checkpoints are written to a temporary file beside the target, fsynced and renamed over it, so a kill mid-write
leaves the previous checkpoint intact; they are read with `weights_only=True`, so a pickle that would run code is
refused before anything runs.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from biozoo._core import BiozooError, CheckpointError
from biozoo.models import safe_torch_load

RUN_DIR_ENV = "BIOZOO_RUN_DIR"  # set by rank 0 for the DDP processes it launches (or by hand, for torchrun)
RESUME_ENV = "BIOZOO_RESUME_FROM"
VERSION = re.compile(r"version_(\d+)$")
RESUMABLE = ("last.ckpt", "on_exception.ckpt")
# a checkpoint being written: .<name>.<host>-<pid>.<random>.tmp beside the target (AtomicCheckpointIO)
TEMPORARY = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.tmp$")
ORPHAN_AGE_S = 3600  # a temporary file nobody wrote to for this long is orphaned, whichever host wrote it


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_orphan_temporaries(root: str | Path) -> list[Path]:
    """Delete the hidden `.<name>.*.tmp` files that killed checkpoint writes left in the checkpoint folders under
    `root`: those written on this host by a process that is gone, and any untouched for ORPHAN_AGE_S (another
    host's, or an older biozoo's). A write still in progress is kept. Returns the removed files."""
    root = Path(root)
    if not root.is_dir():
        return []
    folders = [root / "checkpoints", *(p / "checkpoints" for p in root.iterdir() if p.is_dir())]
    removed = []
    for folder in folders:
        for path in folder.glob(".*.tmp") if folder.is_dir() and not folder.is_symlink() else []:
            match = TEMPORARY.match(path.name)
            try:
                stale = time.time() - path.lstat().st_mtime > ORPHAN_AGE_S
            except FileNotFoundError:
                continue
            dead = match is not None and match["host"] == _host() and not _pid_alive(int(match["pid"]))
            if (dead or stale) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def versions(root: str | Path) -> list[Path]:
    """The version folders under `root`, oldest first."""
    root = Path(root)
    found = [p for p in root.glob("version_*") if p.is_dir() and VERSION.search(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(VERSION.search(p.name).group(1)))


def reserve_run_dir(root: str | Path) -> Path:
    """Create and return the next free `root/version_N` (mkdir is the lock: two runs never share a folder)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = versions(root)
    n = int(VERSION.search(taken[-1].name).group(1)) + 1 if taken else 0
    while True:
        path = root / f"version_{n}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def distributed_run_dir(root: str | Path, create: bool = True) -> Path | None:
    """The run folder every process of one distributed job must share, or None for a normal (rank-0) start.

    A process launched by rank 0 finds it in BIOZOO_RUN_DIR. A job whose processes are started by a scheduler
    uses `root/slurm_<job id>` (so a requeued job continues in its own folder) or BIOZOO_RUN_DIR set by hand.
    """
    if os.environ.get(RUN_DIR_ENV):
        path = Path(os.environ[RUN_DIR_ENV])
    elif os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        path = Path(root) / f"slurm_{os.environ['SLURM_JOB_ID']}"
    else:
        path = None
    if path is not None:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))):
        raise BiozooError(f"this process (rank {os.environ.get('RANK', os.environ.get('LOCAL_RANK'))}) was started "
                          f"by a launcher: set {RUN_DIR_ENV}=<one folder> for every process so all ranks write "
                          "into the same run folder")
    return None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` cannot be a torch checkpoint (missing, truncated, not a zip archive), or None if it looks whole."""
    path = Path(path)
    if not path.is_file():
        return "no such file"
    try:
        with zipfile.ZipFile(path) as archive:  # torch.save's format; a truncated file has no central directory
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "not a torch checkpoint (no data.pkl)"
    except (zipfile.BadZipFile, OSError) as e:
        return f"truncated or corrupt ({e})"
    return None


def resumable_checkpoints(root: str | Path) -> list[Path]:
    """Every checkpoint `--ckpt_path last` may use under `root`, newest first (old `root/checkpoints/` too)."""
    root = Path(root)
    folders = [v / "checkpoints" for v in versions(root)] + [root / "checkpoints"]
    if root.is_dir():
        folders += [p / "checkpoints" for p in root.glob("slurm_*")]
    found = [f / name for f in folders for name in RESUMABLE if (f / name).is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def corrupt_checkpoint_error(path: Path, problem: str, root: str | Path) -> CheckpointError:
    good = next((p for p in resumable_checkpoints(root) if p.resolve() != path.resolve()
                 and checkpoint_problem(p) is None), None)
    previous = f"; the previous good one is {good} (--ckpt_path {good})" if good else "; no earlier good checkpoint"
    return CheckpointError(f"checkpoint {path} is unusable: {problem}{previous}")


def resolve_ckpt_path(ckpt_path: str | None, root: str | Path) -> str | None:
    """`last` -> the newest resumable checkpoint of an earlier run under `root` (None when there is none);
    a path is checked. Either way a corrupt file raises a CheckpointError naming the previous good one."""
    if ckpt_path in (None, "best", "hpc", "registry") or str(ckpt_path).startswith("registry:"):
        return ckpt_path
    if ckpt_path == "last":
        candidates = resumable_checkpoints(root)
        if not candidates:
            print(f"biozoo: nothing to resume under {root}; starting fresh", flush=True)
            return None
        path = candidates[0]
    else:
        path = Path(ckpt_path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise corrupt_checkpoint_error(path, problem, root if ckpt_path == "last" else path.parent.parent.parent)
    return str(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a hidden temporary file beside the target, fsyncs it and renames it over the
    target, so a kill mid-write never leaves a truncated file. Reads only weights-only pickles."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_host()}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (RuntimeError, OSError) as e:  # torch reports a full disk as "inline_container.cc: unexpected pos"
            Path(tmp).unlink(missing_ok=True)
            free = shutil.disk_usage(path.parent).free
            raise CheckpointError(f"could not write checkpoint {path} ({free / 2**20:.0f} MiB free on its disk; "
                                  f"a full disk?): {' '.join(str(e).split())[:160]}") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)

    def load_checkpoint(self, path: _PATH, map_location: Callable | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is unusable: {problem}")
        return safe_torch_load(path)
