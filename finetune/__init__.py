"""The fine-tuning library the stages and tools call: configuration, data, models, tasks, batching, training, tracking
and metrics. No command line and no fixed paths: the callers pass what they read and write."""

import logging

# bitsandbytes' CPU backend logs, as it is imported, that the optional `kernels` package (kernels downloaded from the
# hub) is absent: nothing about the run. Set here, before any stage imports a library that imports bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
