"""A training run (run.py) and what it is made of: precision, checkpoints and resume, callbacks, progress, ranks."""

# How the search tool tells a training it is a trial that reports to a pruner (here, where the search can read it
# without importing torch)
TRIAL_ENV = "DVC_FINETUNE_TRIAL"
