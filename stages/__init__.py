"""The pipeline's stages (`python -m stages.<name>`) and the helpers they share."""

import logging

# bitsandbytes' CPU backend logs, as it is imported, that the optional `kernels` package (kernels downloaded from the
# hub) is absent: nothing about the run. Set here, before any stage imports a library that imports bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
