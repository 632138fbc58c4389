"""Console logging for the entry points: ldm_jax's own lines at INFO, library
chatter (Orbax, absl) only from WARNING up."""
import logging
import sys


def setup_logging() -> None:
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  log = logging.getLogger("ldm_jax")
  if not log.handlers:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
  log.setLevel(logging.INFO)
  log.propagate = False
