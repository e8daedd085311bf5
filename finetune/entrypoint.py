"""How an entry point (a stage or a tool) runs: quiet library progress bars in log files, the library warnings that
say nothing about the run silenced, and bad input reported as one line with a non-zero exit."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from finetune.config.schema import ParamsError
from finetune.errors import StageError


def quiet_library_bars() -> None:
    """In a log file (stderr not a terminal), the libraries' own progress bars (loading weights, reading datasets)
    would redraw with carriage returns; turn them off. The stages print plain progress lines instead."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers and the hub read it at import
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already: its setting was read
        from transformers.utils import logging

        logging.disable_progress_bar()


def quiet_library_warnings() -> None:
    """Library warnings that are not ours to fix and say nothing about the run, each silenced by its own text (and
    bitsandbytes' import-time message in stages/__init__.py); anything else still shows."""
    import warnings

    # peft's PeftModel reads transformers' deprecated `is_gradient_checkpointing` alias (peft 0.21, transformers 5)
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def run_main(stage: Callable[[], None]) -> None:
    """Run a stage's main(): bad params or input exit 2 with the message, not a traceback; a file that cannot be
    read or written (a full disk, a read-only folder) exits 1 naming the file and the reason."""
    quiet_library_bars()
    quiet_library_warnings()
    try:
        stage()
    except (ParamsError, StageError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        sys.exit(1)
