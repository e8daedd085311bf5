"""A training run (run.py) and what it is made of: precision, checkpoints and resume, callbacks, progress, ranks."""
