"""Which process wrote each file, from the kernel's side: `strace` follows a command and every process it starts, and
records each open for writing, rename, unlink and mkdir, per process (a thread's calls count for its process).
Native writes are seen as well as Python's (safetensors, torch.save, DVCLive's), which an audit hook would miss."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

CALLS = ("open", "openat", "openat2", "creat", "rename", "renameat", "renameat2", "unlink", "unlinkat", "mkdir",
         "mkdirat", "rmdir", "execve", "clone", "clone3", "fork", "vfork")
LINE = re.compile(r"^(\w+)\((.*)\) += (-?\d+)(<[^>]*>)?")
STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
DIRFD = re.compile(r'(?:AT_FDCWD|\d+)(?:<([^>]*)>)?\s*,\s*"((?:[^"\\]|\\.)*)"')  # dirfd (its path with -y), path
FLAGS = re.compile(r'"\s*,\s*([A-Z_|]+)')
WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC")


def available() -> bool:
    """strace is installed and may trace here (a container can forbid ptrace)."""
    return shutil.which("strace") is not None and subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "true"], capture_output=True).returncode == 0


def traced(command: list[str], trace_dir: Path) -> list[str]:
    """`command` under strace, one trace file per thread in `trace_dir`."""
    trace_dir.mkdir(parents=True, exist_ok=True)
    # --seccomp-bpf: only the traced calls stop the process; "?": a call this architecture lacks is skipped
    return ["strace", "-f", "-ff", "-qq", "-y", "--seccomp-bpf", "-s", "2048",
            "-e", "trace=" + ",".join("?" + call for call in CALLS), "-o", str(trace_dir / "t"), *command]


def _paths(call: str, args: str, root: Path) -> list[str]:
    """The path a successful rename, unlink, mkdir or rmdir changed: a rename's target, what it removed or
    made (opens are read from the descriptor strace resolved). Relative paths are taken from `root` (every traced
    process runs there)."""
    found = [path if path.startswith("/") or not folder else f"{folder}/{path}"
             for folder, path in DIRFD.findall(args)]
    if not found:  # rename, unlink, mkdir, rmdir: plain paths
        found = STRING.findall(args)
    if call.startswith("rename"):
        found = found[1:2]
    return [str((root / p).resolve()) if not p.startswith("/") else str(Path(p).resolve()) for p in found[:1]]


def file_writers(trace_dir: Path, root: Path) -> tuple[dict[str, set[int]], dict[int, str]]:
    """From the traces in `trace_dir`: each path under `root` (outside .git and .dvc) -> the processes that wrote,
    renamed onto, removed or made it; and each process -> the command it ran (its last execve)."""
    root = root.resolve()
    thread_of: dict[int, int] = {}  # a thread's id -> its process's
    parent_of: dict[int, int] = {}  # a process -> the thread that started it
    calls: dict[int, list[tuple[str, str, int, str]]] = {}
    for trace in trace_dir.glob("t.*"):
        tid = int(trace.suffix[1:])
        calls[tid] = []
        for line in trace.read_text(errors="replace").splitlines():
            match = LINE.match(line)
            if not match:
                continue
            call, args, result, resolved = match.group(1), match.group(2), int(match.group(3)), match.group(4)
            if call in ("clone", "clone3", "fork", "vfork") and result > 0:
                (thread_of if "CLONE_THREAD" in args else parent_of)[result] = tid
            calls[tid].append((call, args, result, (resolved or "<>")[1:-1]))

    def process(tid: int) -> int:
        while tid in thread_of:
            tid = thread_of[tid]
        return tid

    writers: dict[str, set[int]] = {}
    commands: dict[int, str] = {}
    for tid, made in calls.items():
        pid = process(tid)
        for call, args, result, resolved in made:
            if result < 0 or call in ("clone", "clone3", "fork", "vfork"):
                continue
            if call == "execve":  # execve("path", ["arg", ...], 0x... /* N vars */)
                argv = args.split(", [", 1)[-1].rsplit("], ", 1)[0]
                commands[pid] = " ".join(STRING.findall(argv))
                continue
            if call in ("open", "openat", "openat2", "creat"):
                flags = "O_CREAT" if call == "creat" else (FLAGS.findall(args) or [""])[0]
                paths = [resolved] if resolved and any(f in flags for f in WRITE_FLAGS) else []
            else:
                paths = _paths(call, args, root)
            for path in paths:
                inside = path.startswith(str(root) + "/")
                if inside and not any(part in path for part in ("/.git/", "/.dvc/", "/__pycache__/")):
                    writers.setdefault(path, set()).add(pid)

    def command(pid: int) -> str:
        """Its own last execve's, or, for a process forked without one, its parent's."""
        seen = set()
        while pid not in commands and pid in parent_of and pid not in seen:
            seen.add(pid)
            pid = process(parent_of[pid])
        return commands.get(pid, "")

    return writers, {pid: command(pid) for pid in {p for pids in writers.values() for p in pids} | set(commands)}
