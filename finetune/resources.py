"""Sharing one machine between the experiments running on it at once (`dvc queue start -j N`): cores and GPUs.

Left alone, every stage process starts as many threads as the machine has cores and they fight over them (two
trainings at once on 2 cores: 3.2k tokens/s each, against 12.7k alone and 8.2k each with one thread each), and
every experiment trains on cuda:0. So each heavy stage process (prepare, train, evaluate, merge) calls
`share_machine` first, which

- holds a *slot* while the process lives: a file in a folder all of this user's processes on the machine share
  (DVC_FINETUNE_SLOTS, else <tmp>/dvc-finetune-<uid>), locked with flock, which the system releases when the
  process ends however it ends (SIGKILL included), so a dead run never keeps a share;
- sets the process's threads (params resources.threads: auto) to the cores divided among the slots held now,
  and training looks again every few seconds (`ThreadShare`), so a run that started alone gives cores back
  when a second one starts, and takes them again when it ends;
- on a GPU machine, first locks the GPUs it will use (resources.gpus: auto: one per training process of
  distributed.nproc_per_node, for evaluate and merge too; prepare none) among those CUDA_VISIBLE_DEVICES lists
  (else all), skipping those another running experiment holds, and narrows CUDA_VISIBLE_DEVICES to them before
  CUDA starts; while too few are free it waits, saying so.

A process that a launcher started (torchrun, accelerate launch: LOCAL_RANK is set) is placed by its launcher and
takes no slot and no GPU lock, so other experiments do not see the GPUs it uses: start such runs on GPUs no queue
uses (CUDA_VISIBLE_DEVICES).
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
import time
from pathlib import Path

SLOTS_ENV = "DVC_FINETUNE_SLOTS"
AUTO_ENV = "DVC_FINETUNE_THREADS"  # "auto" while the threads follow the share (inherited by a launcher's workers)
RECHECK_S = 5.0  # how often training looks at how many stage processes share the machine
_held: dict[str, object] = {}  # this process's open, locked files (its slot, its GPUs), by path: kept while it lives


def slots_dir() -> Path:
    """The folder of this user's slots and GPU locks: private to the user (another user's folder there is refused)."""
    folder = Path(os.environ.get(SLOTS_ENV) or Path(tempfile.gettempdir()) / f"dvc-finetune-{os.getuid()}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.is_symlink() or folder.stat().st_uid != os.getuid():
        from finetune.errors import StageError

        raise StageError(f"{folder}: not a folder of this user's; set {SLOTS_ENV} to one that is")
    return folder


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _locked(path: Path):
    """`path` opened and locked by this process, or None when another process holds it."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _holder(handle) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()


def hold_slot() -> None:
    """Count this process among the running ones until it ends (once per process). The file is locked under a
    temporary name and then renamed, so that no one counting sees it unlocked."""
    if any(name.endswith(".slot") for name in _held):
        return
    import atexit

    folder, name = slots_dir(), f"{os.getpid()}.{time.monotonic_ns()}"
    handle = _locked(folder / f".{name}.new")
    _holder(handle)
    (folder / f".{name}.new").rename(folder / f"{name}.slot")
    _held[str(folder / f"{name}.slot")] = handle
    atexit.register(lambda: (folder / f"{name}.slot").unlink(missing_ok=True))  # a killed process: see running()


def running() -> int:
    """Stage processes holding a slot now (at least this one); the files of those that ended are removed."""
    count = 0
    for path in slots_dir().glob("*.slot"):
        handle = None if str(path) in _held else _locked(path)
        if handle is None:
            count += 1  # held: by a running process, or by this one
            continue
        path.unlink(missing_ok=True)  # its process ended; the lock was ours only for this look
        handle.close()
    return max(count, 1)


def thread_share(setting: int | str, per_process: int = 1) -> int:
    """Threads for each of `per_process` processes of one stage: the setting, or the cores divided among the
    running stage processes."""
    if setting != "auto":
        return int(setting)
    return max(1, cores() // running() // per_process)


def set_threads(threads: int) -> None:
    """This process's compute threads, and those of what it starts (training workers, tokenizers)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["RAYON_NUM_THREADS"] = str(threads)


def take_gpus(count: int, candidates: list[str], poll_s: float = 2.0, say=print) -> list[str]:
    """Lock `count` of `candidates` (GPU ids as CUDA_VISIBLE_DEVICES names them) that no other process holds,
    waiting (and saying so, once) until enough are free; held until this process ends."""
    if count > len(candidates):
        from finetune.errors import StageError

        raise StageError(f"this run needs {count} GPUs and this machine shows {len(candidates)} "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    folder = slots_dir()
    waited = False
    while True:
        taken = []
        for gpu in candidates:
            handle = _locked(folder / f"gpu-{gpu.replace('/', '_')}.lock")
            if handle is not None:
                taken.append((gpu, handle))
                if len(taken) == count:
                    break
        if len(taken) == count:
            for gpu, handle in taken:
                _holder(handle)
                _held[handle.name] = handle
            if waited:
                say(f"GPU {', '.join(g for g, _ in taken)} free now: starting", file=sys.stderr, flush=True)
            return [g for g, _ in taken]
        for _, handle in taken:  # not enough: give back the part, so two waiting runs cannot each hold half
            handle.close()
        if not waited:
            holders = sorted({(folder / f"gpu-{g}.lock").read_text().strip() for g in candidates
                              if (folder / f"gpu-{g}.lock").exists()} - {""})
            say(f"waiting for {count} free GPU(s): the {len(candidates)} of this machine are held by other running "
                f"experiments (pids {', '.join(holders) or 'unknown'})", file=sys.stderr, flush=True)
            waited = True
        time.sleep(poll_s)


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (without starting CUDA)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    if not torch.backends.cuda.is_built():
        return []
    # counted through NVML, which does not start CUDA (CUDA would read CUDA_VISIBLE_DEVICES once, before it is set);
    # without NVML, no placement: the stage sees every GPU
    return [str(i) for i in range(max(0, torch.cuda._device_count_nvml()))]


def share_machine(processes: int = 1, gpus: bool = True) -> None:
    """Take this stage's share of the machine, as params resources say (see the module's docstring): GPUs of its
    own when `gpus` (resources.gpus: auto: as many as the training's processes, distributed.nproc_per_node, so a
    model trained over N GPUs is evaluated and merged over N), then its slot, then the threads of each of its
    `processes`. With resources.threads: auto, OMP_NUM_THREADS set in the environment is the user's choice and is
    kept; a number of threads is set whatever the environment says."""
    from finetune.config.params import load_params

    if "LOCAL_RANK" in os.environ:
        return  # started by a launcher (torchrun, accelerate launch): its launcher placed it
    params = load_params(sections=["resources", "distributed"])
    settings, nproc = params.resources, params.distributed.nproc_per_node
    if gpus and settings.gpus != "all" and (candidates := visible_gpus()):
        wanted = max(nproc if settings.gpus == "auto" else settings.gpus, processes)
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(take_gpus(wanted, candidates))
    hold_slot()  # after the wait for GPUs: a run waiting for one takes no share of the cores
    if settings.threads != "auto" or "OMP_NUM_THREADS" not in os.environ:
        set_threads(thread_share(settings.threads, processes))
        if settings.threads == "auto":
            os.environ[AUTO_ENV] = "auto"


def shared_threads() -> list:
    """The Trainer callback that keeps a training process at its share of the cores as other runs start and end
    (resources.threads: auto, set by share_machine; each of a launcher's workers takes its part of the share);
    none otherwise."""
    from transformers import TrainerCallback

    if os.environ.get(AUTO_ENV) != "auto":
        return []
    per_process = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

    class ThreadShare(TrainerCallback):
        checked = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            now = time.monotonic()
            if now - self.checked >= RECHECK_S:
                self.checked = now
                set_threads(thread_share("auto", per_process))

    return [ThreadShare()]
