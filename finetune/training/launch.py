"""Starting the workers of a multi-process run with PyTorch's own launcher (torch.distributed.run, i.e. torchrun).

`python -m stages.train` with params distributed.nproc_per_node > 1 starts that many copies of itself on this node
and waits for them; each copy finds the launcher's environment (LOCAL_RANK, RANK, WORLD_SIZE) and trains as one
process of the run. A stage that a launcher started already (torchrun, accelerate launch, a Slurm script running
torchrun on each node) trains as it was started, whatever nproc_per_node says: that is how several nodes run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

WORKER_ENV = "DVC_FINETUNE_WORKER"  # set on the workers this module starts


def die_with_parent(signum: int = signal.SIGKILL) -> None:
    """Have Linux send `signum` to this process when its parent dies, however it dies (SIGKILL included): a worker
    whose launcher was killed must not train on and write its outputs later. Elsewhere, nothing to do."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signum)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signum)


def launched() -> bool:
    """Whether a launcher started this process (torchrun and accelerate launch set LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def launch(nproc: int, module: str, argv: list[str]) -> int:
    """Run `python -m module *argv` as `nproc` processes on this node (a standalone rendezvous on a free port) and
    return the launcher's exit status. On CPU each process gets its share of the cores (OMP_NUM_THREADS), unless the
    environment sets it: more threads than cores make every process many times slower. A SIGTERM or SIGINT to this
    process is passed on to the launcher, which stops the workers."""
    import torch

    env = {**os.environ, WORKER_ENV: "1"}
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, *argv]
    print(f"starting {nproc} training processes: torchrun --standalone --nproc_per_node={nproc} -m {module} "
          + " ".join(argv), file=sys.stderr, flush=True)
    # the launcher stops its workers when it gets SIGTERM, and gets it when this process dies; each worker dies
    # with the launcher (stages.train calls die_with_parent in each)
    child = subprocess.Popen(command, env=env, preexec_fn=lambda: die_with_parent(signal.SIGTERM))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: child.send_signal(number))
    return child.wait()
