"""Where a step's time goes: op time per part of the model, from a JAX profiler trace.

`profile_steps` runs a few steps of a compiled step under `jax.profiler.trace` (a TensorBoard /
Perfetto trace is left in the directory) and adds up the time of every executed HLO op of the
step's module. Each op is put in one category, from the compiled HLO (backend-independent):

- `matmul`: an op that contains a dot or a convolution (a YNNPACK/oneDNN fusion on CPU, a
  cuBLAS/cuDNN call or a fusion on GPU/TPU), `attention (fused)`: a fused attention kernel;
- `collective`: all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute;
- then by the JAX name scope of the op's source (its `op_name` metadata): `optimizer` (the
  trainer's update, under the `optimizer` name scope), `dropout`, `layer norm`, `attention
  (softmax, masks)`, `feed-forward (GELU)`, `embeddings`, `encoder (residual adds)`, `heads,
  losses, other`; `copy/transpose` for layout copies.

Op times can add up to more than the step's wall time: XLA:CPU runs independent ops at once.
So the step's wall time is also split by how many op events are open at once (none, one,
several): time with none is dispatch, and work that outlives its op's event (XLA:CPU's Eigen
dots finish on Eigen's threads after the event of their `dot` op has closed, so their time is
missing from the op times).
The matmul rate is the dots' FLOPs (2 x output size x contracted size, from the HLO shapes)
over the matmul ops' time, leaving out XLA:CPU's Eigen dots; None where no dot is visible
(library calls).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import itertools
import math
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax

from bert_jax import files

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# (category, pattern searched in the op_name metadata), first match wins
SCOPES = (("optimizer", r"/optimizer/"), ("dropout", r"(?i)dropout"),
          ("layer norm", r"layer_norm"), ("attention (softmax, masks)", r"/attention/"),
          ("feed-forward (GELU)", r"/ffn/"), ("embeddings", r"/embeddings/"),
          ("encoder (residual adds)", r"/encoder/"), ("heads, losses, other", r""))
# Control flow whose events span the ops inside it, which have events of their own.
CONTAINERS = ("while", "conditional", "call", "async-start", "async-done")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?) "
                    r"([\w\-]+)\((.*)$")


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  opcode: str
  rest: str  # operands and attributes

  @property
  def called(self) -> list[str]:
    return re.findall(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)",
                      self.rest)

  @property
  def op_name(self) -> str:
    m = re.search(r'op_name="([^"]*)"', self.rest)
    return m.group(1) if m else ""


def parse_hlo(text: str) -> tuple[dict[str, Instr], dict[str, list[str]]]:
  """Compiled HLO text -> (instruction by name, instruction names by computation)."""
  instrs, comps, current = {}, {}, None
  for line in text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      words = line.split()
      current = (words[1] if words[0] == "ENTRY" else words[0]).lstrip("%")
      comps[current] = []
    elif current is not None:
      m = _INSTR.match(line)
      if m:
        instrs[m.group(1)] = Instr(m.group(1), m.group(2), m.group(3), m.group(4))
        comps[current].append(m.group(1))
  return instrs, comps


def _dims(shape: str) -> list[int]:
  m = re.match(r"\w+\[([\d,]*)\]", shape)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def _dot_flops(dot: Instr, instrs: dict[str, Instr]) -> int:
  """2 x output elements x contracted elements of one dot."""
  lhs = instrs.get(re.match(r"\s*%?([\w.\-]+)", dot.rest).group(1))
  m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", dot.rest)
  if lhs is None or m is None:
    return 0
  dims = _dims(lhs.shape)
  contracted = math.prod(dims[int(i)] for i in m.group(1).split(",") if i)
  return 2 * math.prod(_dims(dot.shape)) * contracted


def instructions_inside(name: str, instrs: dict[str, Instr], comps: dict[str, list[str]]
                        ) -> list[Instr]:
  """The instruction and every instruction of the computations it calls, recursively."""
  out, todo, seen = [], [name], set()
  while todo:
    instr = instrs.get(todo.pop())
    if instr is None:
      continue
    out.append(instr)
    for comp in instr.called:
      if comp not in seen:
        seen.add(comp)
        todo.extend(comps.get(comp, []))
  return out


def categorise(name: str, instrs: dict[str, Instr], comps: dict[str, list[str]]
               ) -> tuple[str, int]:
  """(category, dot FLOPs) of one executed op."""
  body = instructions_inside(name, instrs, comps)
  targets = " ".join(i.rest for i in body if i.opcode == "custom-call").lower()
  if "fmha" in targets or "flash" in targets or "dot_product_attention" in targets:
    return "attention (fused)", 0
  dots = [i for i in body if i.opcode == "dot"]
  if dots or any(i.opcode == "convolution" for i in body) or "gemm" in targets:
    return "matmul", sum(_dot_flops(d, instrs) for d in dots)
  if any(i.opcode.removesuffix("-start").removesuffix("-done") in COLLECTIVES for i in body):
    return "collective", 0
  if body and all(i.opcode in ("copy", "transpose", "bitcast", "parameter", "fusion")
                  for i in body):
    return "copy/transpose", 0
  scope = next((i.op_name for i in body if i.op_name), "")
  return next(cat for cat, pattern in SCOPES if re.search(pattern, scope)), 0


def op_events(trace_dir: str, names: set[str]) -> list[tuple[str, int, int]]:
  """(op, start ns, end ns) of every execution, in the trace files under `trace_dir`, of the
  ops in `names` (an op in a loop body runs once per iteration). An event is an op's if it is
  named after it or carries its name in an `hlo_op` stat (GPU kernels are named after
  themselves). Device planes are used where any of their events is an op's (a GPU's kernels,
  not their launches on the host); else the host's (XLA:CPU runs ops on host threads).
  Checked on CPU; no accelerator has been at hand."""
  from jax.profiler import ProfileData
  device, host = [], []
  for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
    for plane in ProfileData.from_file(path).planes:
      events = device if plane.name.startswith("/device:") else host
      for line in plane.lines:
        for event in line.events:
          op = event.name if event.name in names else next(
              (v for k, v in event.stats if k == "hlo_op"), None)
          if op in names:
            events.append((op, event.start_ns, event.start_ns + event.duration_ns))
  return device or host


def occupancy(events: list[tuple[str, int, int]], steps: int) -> dict[str, float]:
  """Seconds per step, between the first op's start and the last op's end, with no op event
  open (`idle_s`), one (`one_op_s`) and several at once (`overlap_s`). Idle time is the
  dispatch between steps, and work that outlives its op's event: XLA:CPU hands some dots to
  Eigen, whose threads finish them after the op's event has closed."""
  edges = sorted([(start, 1) for _, start, _ in events] + [(end, -1) for _, _, end in events])
  seconds = collections.Counter()
  running = 0
  for (t, change), (t_next, _) in itertools.pairwise(edges):
    running += change
    seconds[min(running, 2)] += (t_next - t) * 1e-9
  return {"idle_s": seconds[0] / steps, "one_op_s": seconds[1] / steps,
          "overlap_s": seconds[2] / steps}


def breakdown(hlo_text: str, events: list[tuple[str, int, int]], steps: int, devices: int = 1,
              top: int = 10, eigen_dots: bool = False) -> dict[str, Any]:
  """Op time per step and device (`events` of `op_events` over `steps` steps of `devices`
  devices) by category, the matmul rate, the `top` slowest ops, and the step's wall time by how
  many ops ran at once (`occupancy`, per step, all devices together). FLOPs are those one
  device's program executes. With `eigen_dots` (XLA:CPU) the matmul rate leaves out the plain
  `dot` ops, whose events close before Eigen has finished them (`eigen_dot_flops_per_step`)."""
  instrs, comps = parse_hlo(hlo_text)
  runs = steps * devices
  times = collections.defaultdict(lambda: [0.0, 0])
  for op, start, end in events:
    times[op][0] += (end - start) * 1e-9
    times[op][1] += 1
  per_category, flops, matmul_s, ops = collections.Counter(), 0.0, 0.0, []
  untimed_flops = untimed_s = 0.0
  for name, (seconds, executions) in times.items():
    category, dot_flops = categorise(name, instrs, comps)
    per_category[category] += seconds / runs
    if category == "matmul":
      flops += dot_flops * executions / runs
      matmul_s += seconds / runs
      if eigen_dots and instrs[name].opcode == "dot":
        untimed_flops += dot_flops * executions / runs
        untimed_s += seconds / runs
    shape = instrs[name].shape
    ops.append({"op": name, "category": category, "ms": 1e3 * seconds / runs,
                "shape": shape if len(shape) <= 60 else shape[:57] + "..."})
  total = sum(per_category.values())
  return {"op_s_per_step": total,
          "categories": {k: {"s": v, "share": v / total if total else 0.0}
                         for k, v in per_category.most_common()},
          "matmul_flops_per_step": flops, "matmul_s_per_step": matmul_s,
          "eigen_dot_flops_per_step": untimed_flops, "eigen_dot_s_per_step": untimed_s,
          "matmul_flops_per_s": ((flops - untimed_flops) / (matmul_s - untimed_s)
                                 if flops > untimed_flops and matmul_s > untimed_s else None),
          "wall": occupancy(events, steps),
          "top_ops": sorted(ops, key=lambda o: -o["ms"])[:top]}


def profile_steps(run: Callable[[int], Any], hlo_text: str, trace_dir: str, steps: int = 2,
                  devices: int = 1) -> dict[str, Any]:
  """Runs `run(steps)` under the profiler, writing the trace to `trace_dir`, and returns the
  breakdown per step and device (`devices`: the devices running the module in this process).
  A URL `trace_dir` (gs://...) gets the trace uploaded after it was written and read on this
  host's disk (the profiler and the trace reader take local paths)."""
  instrs, _ = parse_hlo(hlo_text)
  ops = {name for name, i in instrs.items() if i.opcode not in CONTAINERS}
  with contextlib.ExitStack() as stack:
    local = (stack.enter_context(tempfile.TemporaryDirectory(prefix="bert_jax.profile."))
             if files.is_url(trace_dir) else trace_dir)
    with jax.profiler.trace(local):
      run(steps)
    result = breakdown(hlo_text, op_events(local, ops), steps, devices,
                       eigen_dots=jax.default_backend() == "cpu")
    if local != trace_dir:
      files.copy(local, trace_dir)
  return {"trace_dir": trace_dir, "steps": steps, **result}


def format_breakdown(result: dict[str, Any], peak: float | None = None) -> str:
  """The breakdown as text: one line per category, the matmul rate, the slowest ops."""
  lines = [f"op time per step and device {1e3 * result['op_s_per_step']:.1f} ms "
           f"(trace in {result['trace_dir']})"]
  for cat, v in result["categories"].items():
    lines.append(f"  {cat:28s} {1e3 * v['s']:9.1f} ms {v['share']:6.1%}")
  rate, eigen = result["matmul_flops_per_s"], result["eigen_dot_flops_per_step"]
  if rate:
    of_peak = f", {rate / peak:.0%} of the peak" if peak else ""
    left_out = (f" (leaving out the Eigen dots, {eigen / 1e9:.1f} GFLOP per step, whose op "
                "events close before they finish)" if eigen else "")
    lines.append(f"  matmuls run at {rate / 1e9:.1f} GFLOP/s{of_peak}{left_out}")
  wall = result["wall"]
  idle = "dispatch" + (", and the Eigen dots after their events" if eigen else "")
  lines.append(f"  wall time per step {1e3 * sum(wall.values()):.1f} ms: one op running "
               f"{1e3 * wall['one_op_s']:.1f} ms, several {1e3 * wall['overlap_s']:.1f} ms, none "
               f"{1e3 * wall['idle_s']:.1f} ms ({idle})")
  lines.append("  slowest ops:")
  lines += [f"    {o['ms']:8.2f} ms  {o['category']:28s} {o['op']} {o['shape']}"
            for o in result["top_ops"]]
  return "\n".join(lines)
