"""The pipeline's DVC stages: one module per stage of dvc.yaml, each a thin `main()` that reads the params it uses and
the paths dvc.yaml gives it, and calls the library (finetune/)."""
