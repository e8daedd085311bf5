"""`python -m tools.search`: see tools/search/__init__.py."""

from finetune.entrypoint import run_main
from tools.search import main

run_main(main)
