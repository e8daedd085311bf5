"""A training run (run.py) and what it is made of: precision, checkpoints and resume, callbacks, progress, ranks."""

# How the search tool tells a training it is a trial that reports to a pruner (here, where the search can read it
# without importing torch)
TRIAL_ENV = "DVC_FINETUNE_TRIAL"
STUDY_STORAGE_ENV = "DVC_FINETUNE_STUDY_STORAGE"  # a study's storage for every search on this machine


def study_storage(spec: str):
    """The Optuna storage a search names: `journal:<path>` a journal file (JournalStorage: appends only, so
    searches on several machines can share one on a shared filesystem), a URL with `://` a database
    (sqlite:///..., postgresql://..., mysql://...)."""
    if spec.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(spec.removeprefix("journal:")))
    return spec
