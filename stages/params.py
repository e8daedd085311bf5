"""params: params.yaml as a whole, checked. The other stages check the sections they read; this one depends on the
whole file, so that a change no other stage reads (a misspelt section added with `dvc exp run -S +trian.seed=1`)
is refused too.

    dvc repro params
    python -m stages.params

Checks the schema and the paths; the hardware is checked by the train stage, which uses it.
"""

from __future__ import annotations

from pathlib import Path

from finetune.config.params import PARAMS_FILE, parse_params
from finetune.config.params import SECTIONS as ALL_SECTIONS
from finetune.config.schema import ParamsError
from finetune.entrypoint import run_main

SECTIONS = list(ALL_SECTIONS)  # of params.yaml, checked here: all of them


def main() -> None:
    if not PARAMS_FILE.exists():
        raise ParamsError([f"{PARAMS_FILE}: not found (run from the repository root)"])
    parse_params(PARAMS_FILE.read_text(encoding="utf-8"), root=Path.cwd())
    print(f"{PARAMS_FILE}: valid")


if __name__ == "__main__":
    run_main(main)
