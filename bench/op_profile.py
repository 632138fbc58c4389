"""Where a jitted step spends its time on the CPU: a jax.profiler trace, op by op.

  python bench/op_profile.py                     # the tiny UNet train step of bench/peer.py
  python bench/op_profile.py --row sd --steps 1  # the SD-1.x UNet forward at 32x32
  python bench/op_profile.py --row tiny2         # the tiny step on 2 CPU devices

It compiles the step of a `bench/peer.py` row, runs `--steps` of it under
`jax.profiler.trace`, reads the trace back (`jax.profiler.ProfileData`) and joins each
executed thunk with its HLO instruction in the compiled module (opcode, fusion kind,
the jax op_name that says which module and whether it is the forward or the backward
pass). Tables: time by role (GroupNorm, convolutions, attention, feed-forward,
the optimizer, ...) x pass, by kind of operation (convolution, matmul, data
movement, elementwise, reduction), by the two together; then the slowest single
instructions.
Times are summed over the runtime's threads (XLA's CPU runtime runs independent
thunks concurrently), so they add up to more than the step; "busy" is that sum over
the step time.
"""
import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import peer  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9\-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%(\S+) ")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--row", default="tiny", choices=("tiny", "tiny2", "sd", "vae", "text"))
  p.add_argument("--steps", type=int, default=3, help="traced steps (after 2 untimed ones)")
  p.add_argument("--top", type=int, default=15, help="slowest instructions listed")
  p.add_argument("--hlo_out", default="", help="also write the compiled HLO text here")
  return p.parse_args(argv)


def hlo_index(text: str) -> dict:
  """instruction name -> (opcode, fused op kinds, op_name) of a compiled HLO module."""
  comps, cur = {}, None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and line.rstrip().endswith("{"):
      cur = comps.setdefault(m.group(1), [])
      continue
    m = _INSTR.match(line)
    if m and cur is not None:
      cur.append((m.group(1), m.group(2), line))
  index = {}
  for body in comps.values():
    for name, opcode, line in body:
      op_name = re.search(r'op_name="([^"]*)"', line)
      called = re.search(r"calls=%([\w.\-]+)", line)
      inner = {op for _, op, _ in comps.get(called.group(1), [])} if called else set()
      index[name] = (opcode, inner, op_name.group(1) if op_name else "")
  return index


def kind_of(opcode: str, inner: set) -> str:
  ops = inner | {opcode}
  if "convolution" in ops:
    return "convolution"
  if "dot" in ops:
    return "matmul"
  if opcode in ("copy", "transpose") or (ops - {"parameter", "bitcast"}) <= {
      "copy", "transpose", "bitcast", "reshape", "slice", "concatenate", "pad", "broadcast",
      "dynamic-slice", "dynamic-update-slice", "reverse"}:
    return "data movement"
  if ops & {"all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-reduce-start",
             "all-reduce-done"}:
    return "collective"
  if "reduce" in ops:
    return "reduction (+ fused elementwise)"
  return "elementwise"


def role_of(op_name: str) -> tuple:
  """(role, pass) of an instruction from its jax op_name."""
  bwd = "transpose(" in op_name
  m = re.search(r"\((UNetModel|AutoencoderKL|CLIPTextTransformer)\)\)?/(.*)", op_name)
  if not m:
    return ("loss, optimizer, outside the model", "bwd" if bwd else "fwd")
  path = m.group(2)
  passname = "bwd" if bwd else "fwd"
  if re.search(r"transformer_blocks_\d+/norm\d|layer_norm|final_layer_norm", path):
    return ("LayerNorm", passname)
  if re.search(r"/attn\d/|self_attn/", path):
    return ("attention (projections, QK^T, softmax, AV)", passname)
  if re.search(r"/ff/|/mlp/", path):
    return ("feed-forward (GEGLU / MLP)", passname)
  if re.search(r"/proj_(in|out)/", path):
    return ("transformer proj_in / proj_out", passname)
  if re.search(r"(/|^)(norm\d?|conv_norm_out|group_norm)/", path):
    return ("GroupNorm", passname)
  if re.search(r"conv\d|conv_shortcut|conv_in|conv_out|downsamplers|upsamplers|/conv/", path):
    return ("convolutions", passname)
  if re.search(r"time_emb|time_embedding", path):
    return ("time embedding", passname)
  if re.search(r"silu|swish", path):
    return ("SiLU", passname)
  return ("other inside the model", passname)


def trace_step(step, steps: int):
  """Runs `step` under the profiler; returns (events [(thread, name, ns)], wall s/step)."""
  import jax
  from jax.profiler import ProfileData
  for _ in range(2):
    jax.block_until_ready(step())
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      t0 = time.perf_counter()
      for _ in range(steps):
        jax.block_until_ready(step())
      wall = (time.perf_counter() - t0) / steps
    data = ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
    events = [(line.name, ev.name, ev.duration_ns) for plane in data.planes
              for line in plane.lines if "XLAEigen" in line.name for ev in line.events]
  return events, wall


def main(argv=None):
  args = parse_args(argv)
  n, step, compiled = peer.jax_side(args.row, return_compiled=True)
  print(common.machine_line())
  text = compiled.as_text()
  if args.hlo_out:
    with open(args.hlo_out, "w") as f:
      f.write(text)
  index = hlo_index(text)
  events, wall = trace_step(step, args.steps)
  by_role, by_kind, by_instr, by_pair = (collections.Counter() for _ in range(4))
  total = 0.0
  for _, name, ns in events:
    if name not in index:
      continue  # runtime bookkeeping (ThunkExecutor::Execute, thread-pool waits)
    opcode, inner, op_name = index[name]
    s = ns / 1e9 / args.steps
    total += s
    kind = kind_of(opcode, inner)
    # XLA combines the gradients' all-reduces and keeps one of their op_names.
    role = ("gradient all-reduce (data parallel)", "bwd") if kind == "collective" \
        else role_of(op_name)
    by_role[role] += s
    by_kind[(kind, role[1])] += s
    by_instr[(name, opcode, op_name[-90:])] += s
    by_pair[(role[0], kind)] += s
  print(f"{peer.ROWS[args.row]}: {n:,} parameters, step {wall:.3f} s under the profiler; "
        f"thunk time {total:.3f} s summed over threads (busy {total / wall:.2f} threads)")
  roles = sorted({r for r, _ in by_role}, key=lambda r: -(by_role[(r, 'fwd')] + by_role[(r, 'bwd')]))
  common.print_table(["role", "fwd s", "bwd s", "share"],
                     [[r, by_role[(r, "fwd")], by_role[(r, "bwd")],
                       (by_role[(r, "fwd")] + by_role[(r, "bwd")]) / total] for r in roles],
                     title="Thunk time by role (per step, summed over threads)")
  kinds = sorted({k for k, _ in by_kind}, key=lambda k: -(by_kind[(k, 'fwd')] + by_kind[(k, 'bwd')]))
  common.print_table(["kind", "fwd s", "bwd s", "share"],
                     [[k, by_kind[(k, "fwd")], by_kind[(k, "bwd")],
                       (by_kind[(k, "fwd")] + by_kind[(k, "bwd")]) / total] for k in kinds],
                     title="Thunk time by kind of operation")
  common.print_table(["role", "kind", "s", "share"],
                     [[r, k, v, v / total] for (r, k), v in by_pair.most_common(args.top)],
                     title="Thunk time by role and kind (largest first)")
  common.print_table(["instruction", "opcode", "op_name (end)", "ms"],
                     [[i, o, p, s * 1e3] for (i, o, p), s in by_instr.most_common(args.top)],
                     title=f"The {args.top} slowest instructions")


if __name__ == "__main__":
  main()
