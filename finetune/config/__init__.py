"""params.yaml, typed: one module per concern, each holding the dataclasses of its sections (`data.py`: data and
prepare; `model.py`: model, quantization, lora; `train.py`; `evaluate.py`: evaluate and export; `tracking.py`), the
schema machinery (`schema.py`), the checks of paths (`paths.py`) and hardware (`hardware.py`), and `params.py`,
which loads the sections a stage asks for and imports no others: a stage runs only the schema code of what it reads.
"""
