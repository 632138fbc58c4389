"""`python -m ldm_jax.train --config=... --print_config`: every field of a config
with its value and the comments that document it.

A field is documented once, by the comment on the line that defines it (or the
comment lines just above): its meaning where its section is built
(config_lib.spine, data/pipeline.py, training/autoencoder.py, training/ldm.py,
training/conditioning.py), and the reason for a recipe's choice in the config
file (and the config files it builds on, `config_lib.sibling`). This module reads
those comments from the source files.
"""
import os
import re
import tokenize

from ldm_jax import config_lib

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# Module (under ldm_jax/) -> the prefixes its local names take in the whole config.
_SECTIONS = {
    "config_lib.py": ("", "stage1.", "stage2."),
    "data/pipeline.py": ("data.",),
    "training/autoencoder.py": ("stage1.",),
    "training/ldm.py": ("stage2.",),
    "training/conditioning.py": ("stage2.text.",),
    "models/autoencoder.py": ("stage1.model.",),  # the modules' fields are the model kwargs
}
# Model kwargs documented in a module's docstring (`Attributes:`) -> their prefix.
_ATTRIBUTES = {"stage2.unet.": ("ldm_jax.models.unet", "UNetModel")}
_ASSIGN = re.compile(r"^\s*\w+\.([\w.]+)\s*=(?!=)")     # c.a.b = ...
_FIELD = re.compile(r"^  (\w+): [^=]+=")                # a dataclass field: name: type = ...
_KEYWORD = re.compile(r"^\s*(\w+)=(?!=)")               # a=..., inside dict(
_DICT_OPEN = re.compile(r"^\s*(?:\w+\.([\w.]+)\s*=|return)\s.*\bdict\($")
_IF = re.compile(r"^(\s*)(if|elif|else)\b\s*(.*?):\s*$")
_SIBLING = re.compile(r"""sibling\(__file__,\s*["'](\w+)["']\)""")


def comments(path: str) -> dict:
  """{local dotted name: comment} of the assignments in the file `path` that carry
  a comment at the end of their line or in the comment lines just above; one
  made under an `if` says so, e.g. '(if tiny) a high learning rate'."""
  with open(path, "rb") as f:
    tokens = list(tokenize.tokenize(f.readline))
  trailing, lines = {}, {}
  for t in tokens:
    if t.type == tokenize.COMMENT:
      line = t.line[:t.start[1]]
      key = "block" if not line.strip() else "trailing"
      (lines if key == "block" else trailing)[t.start[0]] = t.string.lstrip("#").strip()
  with open(path, encoding="utf-8") as f:
    source = f.read().splitlines()
  out, prefix, depth, conditions = {}, None, 0, []
  for n, text in enumerate(source, start=1):
    code = text.split("#", 1)[0] if n in trailing or n in lines else text
    indent = len(code) - len(code.lstrip())
    if code.strip():
      conditions = [(i, c) for i, c in conditions if i < indent]
    cond = _IF.match(code)
    if cond:
      word, test = cond.group(2), cond.group(3)
      conditions.append((indent, test if word != "else" else "else"))
    name = None
    if prefix is not None and depth > 0:
      m = _KEYWORD.match(code)
      name = prefix + m.group(1) if m else None
    else:
      m = _ASSIGN.match(code) or _FIELD.match(code)
      name = m.group(1) if m else None
    opened = _DICT_OPEN.match(code.rstrip())
    if opened and depth == 0:
      prefix, name = (opened.group(1) + "." if opened.group(1) else ""), None
    depth = max(depth + code.count("(") - code.count(")"), 0) if prefix is not None else 0
    if prefix is not None and depth == 0 and not opened:
      prefix = None
    if name is None:
      continue
    doc = trailing.get(n)
    if doc is None:  # the comment lines just above
      above, k = [], n - 1
      while k in lines:
        above.insert(0, lines[k])
        k -= 1
      doc = " ".join(above) or None
    if doc:
      where = " and ".join(c for _, c in conditions)
      out[name] = f"({where}) {doc}" if where else doc
  return out


def attributes(docstring: str) -> dict:
  """{name: text} of a Google-style docstring's `Attributes:` section."""
  out, name, inside = {}, None, False
  for line in (docstring or "").splitlines():
    if line.strip() == "Attributes:":
      inside = True
      continue
    if inside:
      m = re.match(r"^    (\w+): (.*)", line)
      if m:
        name, out[m.group(1)] = m.group(1), m.group(2).strip()
      elif line.startswith("      ") and name:
        out[name] += " " + line.strip()
      elif line.strip():
        break
  return out


def _config_files(config_path: str) -> list:
  """The config file and, first, the config files it builds on."""
  path, sep, _ = config_path.partition(".py:")  # a --config value may carry its arg
  files, todo = [], [os.path.abspath(path + ".py" if sep else path)]
  while todo:
    path = todo.pop()
    if path in files or not os.path.isfile(path):
      continue
    files.insert(0, path)
    with open(path, encoding="utf-8") as f:
      todo += [os.path.join(os.path.dirname(path), s + ".py") for s in _SIBLING.findall(f.read())]
  return files


def field_docs(config_path: str) -> dict:
  """{dotted field name: [comments]} from the defining modules, then the config files."""
  docs = {}
  for module, prefixes in _SECTIONS.items():
    for name, doc in comments(os.path.join(_PACKAGE, module)).items():
      for p in prefixes:
        docs.setdefault(p + name, []).append(doc)
  import importlib
  for prefix, (module, cls) in _ATTRIBUTES.items():
    doc = getattr(importlib.import_module(module), cls).__doc__
    for name, text in attributes(doc).items():
      docs.setdefault(prefix + name, []).append(text)
  for path in _config_files(config_path):
    for name, doc in comments(path).items():
      if doc not in docs.setdefault(name, []):
        docs[name].append(doc)
  return docs


def _flatten(d: dict, prefix: str = "") -> list:
  out = []
  for k, v in d.items():
    if isinstance(v, dict):
      out += _flatten(v, f"{prefix}{k}.")
    else:
      out.append((prefix + k, v))
  return out


def _short(value, width: int = 100) -> str:
  text = repr(value)
  if len(text) > width and isinstance(value, (list, tuple)):
    return f"{text[:width - 20]}... ({len(value)} items)"
  return text


def describe(config, config_path: str) -> str:
  """One line per field, `name = value  # comments`, in the config's order. A
  stage's override of a spine field (stage1.batch_size) carries the spine's comment."""
  docs = field_docs(config_path)
  lines = []
  for name, value in _flatten(config_lib.to_dict(config)):
    doc = docs.get(name, [])
    lines.append(f"{name} = {_short(value)}" + (f"  # {' | '.join(doc)}" if doc else ""))
  return "\n".join(lines)
