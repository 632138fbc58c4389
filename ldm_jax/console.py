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


def progress(iterable=None, **kw):
  """A tqdm progress bar on stderr for a long job outside the training loop (encoding
  the latent cache, sampling for evaluation), drawn by process 0 only; kw go to tqdm."""
  import jax
  from tqdm import tqdm
  return tqdm(iterable, disable=jax.process_index() != 0, **kw)
