"""The entry points' shared `run(main)`: absl's app.run, with every expected failure
-- a bad flag or config field, a missing file, a request the model cannot serve,
a diverged run -- printed as one line on stderr, never the flag help or a traceback.

Exit codes: 0 done; 2 the command cannot succeed as given (run again unchanged, it
fails the same way, so a launcher should not retry it); 1 anything else, with its
traceback (a bug). `--debug` shows the traceback of an expected failure too.
"""
import re
import sys
from typing import Callable

from absl import app, flags

flags.DEFINE_bool("debug", False, "On an error, print its traceback instead of one line.")
FLAGS = flags.FLAGS

# Failures of the input or of the run, not of the code. FloatingPointError: a run
# that diverged (training.loop.Diverged), whose message names where to restart.
EXPECTED = (ValueError, OSError, FloatingPointError, app.UsageError, flags.Error)


def _debug(argv) -> bool:
  """--debug on the command line (read from argv: flag parsing itself may be what failed)."""
  return any(re.fullmatch(r"--debug(=(true|1|yes))?", a, re.IGNORECASE) for a in argv[1:])


def _strings(e: BaseException):
  """Every string argument of `e` and of the exceptions it wraps or was raised from."""
  seen = set()
  todo = [e]
  while todo:
    x = todo.pop(0)
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    for a in getattr(x, "args", ()):
      if isinstance(a, str):
        yield a
      elif isinstance(a, BaseException):
        todo.append(a)
    todo += [x.__cause__, x.__context__]


def _no_such_field(e: BaseException, argv) -> str:
  """A misspelt `--config.a.b=...` override (ml_collections raises a KeyError inside an
  AttributeError, its 'Did you mean' escaped twice over): the flag, the field, the hint."""
  texts = list(_strings(e))
  key = next((m.group(1) for t in texts for m in [re.match(r"'([^'\n]+)'", t)] if m), None)
  if key is None:
    return one_line(e)
  hint = next((m.group(1) for t in texts for m in [re.search(r'Did you mean "([^"]+)"', t)]
               if m), None)
  flag = next((a.split("=")[0] for a in argv[1:] if a.startswith("-") and "." in a and
               key in re.split(r"[.=]", a.lstrip("-").split("=")[0])), None)
  msg = f"the config has no field '{key}'" + (f"; did you mean '{hint}'?" if hint else "")
  return f"{flag}: {msg}" if flag else msg


def one_line(e: BaseException) -> str:
  """`e`'s message on one line. A config file's own error, which config_flags hands on
  as a formatted traceback inside its message, becomes that error's last line."""
  msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  if "Traceback (most recent call last)" in msg:
    head = msg.split("Error whilst parsing config file")[0].rstrip(": \n")
    last = re.sub(r"^\w+: ", "", msg.strip().splitlines()[-1].strip())
    msg = f"{head}: {last}"
  elif "Failed loading config file" in msg:  # config_flags lists the paths it tried
    msg = "cannot load the config file: " + msg[msg.rfind("[Errno"):] if "[Errno" in msg else msg
  return " ".join(re.sub(r"^flag (--)", r"\1", msg).split())


def _fail(message: str) -> None:
  spec = getattr(sys.modules["__main__"], "__spec__", None)
  prog = spec.name if spec is not None else sys.argv[0]
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(2)


def _parse(argv):
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:  # a misspelt config field
    if _debug(argv):
      raise
    _fail(_no_such_field(e, argv))
  except EXPECTED as e:  # absl wraps a parser's TypeError / ValueError in a flags error
    if _debug(argv):
      raise
    _fail(one_line(e))


def run(main: Callable, argv=None) -> None:
  """Runs an entry point's `main(argv)` under absl: flags parsed by `_parse`, and an
  expected failure of `main` turned into one line and exit code 2 (see the module doc)."""
  def wrapped(argv):
    try:
      if len(argv) > 1:
        raise app.UsageError(f"unexpected argument(s) {argv[1:]}: every setting is a --flag")
      return main(argv)
    except EXPECTED as e:
      if FLAGS.debug:
        raise
      _fail(one_line(e))

  app.run(wrapped, argv=argv, flags_parser=_parse)
