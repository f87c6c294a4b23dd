r"""A roofline estimate of a compiled XLA program, read from its optimized HLO.

Each kernel the program launches (a top-level fusion, custom call or copy of
the entry computation, loop bodies counted ``known_trip_count`` times) is
charged ``max(flops / peak FLOP/s, bytes / memory bandwidth)``: the time it
would take at the chip's rates if it did nothing but its own work. The sum
is a lower bound on the step time that the compiled program can reach; the
kernels sorted by that time say where the program moves its bytes, which is
what a memory-bound step has to trim::

  python benchmarks/hlo_roofline.py step.hlo --peak_tflops 989 --hbm_tb_s 4.8

What a kernel costs is read off the HLO:

  bytes   its operands plus its outputs, with two exceptions that keep a
          loop's slices from counting as whole arrays: a fusion parameter
          read only through ``slice``/``dynamic-slice`` counts the slices'
          sizes, and a ``dynamic-update-slice`` output (updated in place)
          counts its update's size and not the buffer it updates.
  flops   ``2 x output elements x contracted elements`` for every ``dot``
          (also inside a GEMM fusion's nested computations) and for cuBLAS
          custom calls; for cuDNN attention (``__cudnn$fmha*``), ``4 B N T S
          D`` forward and ``10 B N T S D`` backward, halved for a causal mask
          (packed rows attend less: an upper bound on their work). Element-
          wise flops are not counted (they are never the bound at these
          sizes), nor those of Pallas kernels (``pallas_call``: their
          bodies are not in the HLO), which count by their bytes.

For instance, ``jnp.dot`` of two ``bf16[1024, 1024]`` arrays is one kernel of
2.1 GFLOP and 6 MiB (two operands and the output); at 989 TFLOP/s and
4.8 TB/s it is compute-bound at 2.2 us. Launch overheads are not modelled;
``kernels`` gives their count.

Kernels are put in categories by their HLO op and ``op_name`` metadata
(``category``): what the metadata's names say is what the model's code
named (``layers_3/mlp/Dropout_0/...``), so the same script reads any
program, not only sld_jax's.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import re
from typing import Any, Iterable, Optional, Sequence

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
_ARRAY_TYPE = re.compile(r"\b(" + "|".join(sorted(DTYPE_BYTES, key=len, reverse=True))
                         + r")\[([0-9,]*)\]")
_NAME = re.compile(r"%[A-Za-z0-9_.\-]+")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?(%[A-Za-z0-9_.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?(%[A-Za-z0-9_.\-]+)\s.*\{\s*$")
# Ops that launch nothing: views, tuples and their parts, parameters, constants.
FREE_OPS = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain",
})
# Ops that read part of their first operand: a fusion parameter read only
# through them costs what they read, not the whole array.
SLICING_OPS = frozenset({"slice", "dynamic-slice", "gather"})
VIEW_OPS = frozenset({"bitcast", "reshape"})


@dataclasses.dataclass
class Instruction:
  name: str
  type: str
  opcode: str
  operands: list[str]
  attributes: str
  is_root: bool = False
  operand_text: str = ""

  @property
  def bytes(self) -> float:
    return type_bytes(self.type)

  def attribute(self, key: str) -> Optional[str]:
    match = re.search(rf"\b{key}=(%[A-Za-z0-9_.\-]+|\"[^\"]*\"|[A-Za-z0-9_]+)", self.attributes)
    return match.group(1).strip('"') if match else None

  @property
  def op_name(self) -> str:
    match = re.search(r'op_name="([^"]*)"', self.attributes)
    return match.group(1) if match else ""


@dataclasses.dataclass
class Computation:
  name: str
  instructions: dict[str, Instruction]
  is_entry: bool = False

  @property
  def root(self) -> Instruction:
    return next(i for i in self.instructions.values() if i.is_root)


@dataclasses.dataclass
class Kernel:
  """One launch: what it reads and writes, its flops, and how often it runs."""
  name: str
  opcode: str
  op_name: str
  category: str
  bytes: float
  flops: float
  count: int

  def seconds(self, peak_flops: float, bandwidth: float) -> float:
    return self.count * max(self.flops / peak_flops, self.bytes / bandwidth)


def array_dims(type_text: str) -> list[tuple[str, list[int]]]:
  """``(dtype, dims)`` of every array in an HLO type (a tuple lists several).

  >>> array_dims("(bf16[16,64]{1,0}, f32[16]{0}, u8[0]{0})")
  [('bf16', [16, 64]), ('f32', [16]), ('u8', [0])]
  """
  return [(dtype, [int(d) for d in dims.split(",") if d])
          for dtype, dims in _ARRAY_TYPE.findall(type_text)]


def type_bytes(type_text: str) -> float:
  return sum(DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in array_dims(type_text))


def _split_type(text: str) -> tuple[str, str]:
  """``"(a, b) fusion(...)..."`` -> ``("(a, b)", "fusion(...)...")``."""
  if text.startswith("("):
    depth = 0
    for i, char in enumerate(text):
      depth += char == "("
      depth -= char == ")"
      if depth == 0:
        return text[:i + 1], text[i + 1:].lstrip()
  type_text, _, rest = text.partition(" ")
  return type_text, rest


def _split_call(text: str) -> tuple[str, str, str]:
  """``"fusion(%a, %b), kind=kLoop"`` -> ``("fusion", "%a, %b", ", kind=kLoop")``."""
  opcode, _, rest = text.partition("(")
  depth = 1
  for i, char in enumerate(rest):
    depth += char == "("
    depth -= char == ")"
    if depth == 0:
      return opcode.strip(), rest[:i], rest[i + 1:]
  raise ValueError(f"unbalanced parentheses in HLO instruction: {text[:200]}")


def parse_module(text: str) -> dict[str, Computation]:
  """The computations of an HLO module's text (``compiled.as_text()``), by name."""
  computations: dict[str, Computation] = {}
  current: Optional[Computation] = None
  for line in text.splitlines():
    if current is None:
      header = _HEADER.match(line)
      if header:
        current = Computation(header.group(2), {}, is_entry=bool(header.group(1)))
      continue
    if line.strip() == "}":
      computations[current.name] = current
      current = None
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    type_text, rest = _split_type(match.group(3))
    opcode, operand_text, attributes = _split_call(rest)
    current.instructions[match.group(2)] = Instruction(
        match.group(2), type_text, opcode, _NAME.findall(operand_text), attributes,
        is_root=bool(match.group(1)), operand_text=operand_text)
  if not any(c.is_entry for c in computations.values()):
    raise ValueError("no ENTRY computation in the HLO text")
  return computations


def _dot_flops(dot: Instruction, computation: Computation) -> float:
  lhs = computation.instructions.get(dot.operands[0])
  if lhs is None:
    return 0.0
  (_, lhs_dims), = array_dims(lhs.type)[:1] or [("", [])]
  contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", dot.attributes)
  contracted = math.prod(lhs_dims[int(d)] for d in contracting.group(1).split(",") if d) \
      if contracting else 1
  out_elements = sum(math.prod(dims) for _, dims in array_dims(dot.type))
  return 2.0 * out_elements * contracted


def _computation_flops(name: str, computations: dict[str, Computation],
                       seen: Optional[set[str]] = None) -> float:
  """Flops of every ``dot`` in a computation and the computations it calls."""
  seen = set() if seen is None else seen
  if name in seen or name not in computations:
    return 0.0
  seen.add(name)
  computation = computations[name]
  flops = 0.0
  for instruction in computation.instructions.values():
    if instruction.opcode == "dot":
      flops += _dot_flops(instruction, computation)
    for callee in re.findall(r"(?:calls|to_apply)=(%[A-Za-z0-9_.\-]+)", instruction.attributes):
      flops += _computation_flops(callee, computations, seen)
  return flops


def _custom_call_flops(instruction: Instruction, computation: Computation) -> float:
  target = instruction.attribute("custom_call_target") or ""
  operand_types = [computation.instructions[o].type for o in instruction.operands
                   if o in computation.instructions]
  if "cudnn$fmha" in target and len(operand_types) >= 2:
    (_, q), = array_dims(operand_types[0])[:1]
    (_, k), = array_dims(operand_types[1])[:1]
    batch, length_q, heads, head_dim = q
    length_kv = k[1]
    work = batch * heads * length_q * length_kv * head_dim
    causal = 0.5 if "CAUSAL" in instruction.attributes else 1.0
    return (10.0 if "Backward" in target else 4.0) * work * causal
  if "gemm" in target or "matmul" in target:
    lhs = array_dims(operand_types[0])[0][1] if operand_types else []
    contracting = re.search(r'"lhs_contracting_dimensions":\["?([0-9"\s,]*)\]',
                            instruction.attributes)
    dims = [int(d) for d in re.findall(r"\d+", contracting.group(1))] if contracting else []
    out_elements = math.prod(array_dims(instruction.type)[0][1])
    return 2.0 * out_elements * math.prod(lhs[d] for d in dims)
  return 0.0


def _fusion_bytes(instruction: Instruction, computation: Computation,
                  computations: dict[str, Computation]) -> float:
  """Bytes a fusion reads and writes (module docstring: slices and in-place updates)."""
  fused = computations.get(instruction.attribute("calls") or "")
  operand_bytes = [computation.instructions[o].bytes if o in computation.instructions else 0.0
                   for o in instruction.operands]
  if fused is None:
    return sum(operand_bytes) + instruction.bytes
  parameters = {int(i.operand_text): i for i in fused.instructions.values()
                if i.opcode == "parameter"}
  users = collections.defaultdict(list)
  for user in fused.instructions.values():
    for operand in user.operands:
      users[operand].append(user)
  root = fused.root
  outputs = [fused.instructions[o] for o in root.operands] if root.opcode == "tuple" else [root]
  updated_in_place = {o.operands[0] for o in outputs if o.opcode == "dynamic-update-slice"}
  def readers(name: str) -> list[Instruction]:
    """What reads ``name``, looking through views."""
    found = []
    for user in users.get(name, []):
      found += readers(user.name) if user.opcode in VIEW_OPS else [user]
    return found

  read = 0.0
  for number, parameter in parameters.items():
    if parameter.name in updated_in_place:
      continue
    direct = users.get(parameter.name, [])
    through_views = readers(parameter.name)
    if through_views and all(u.opcode in SLICING_OPS for u in through_views) and all(
        u.opcode in VIEW_OPS or u.operands[0] == parameter.name for u in direct):
      read += sum(u.bytes for u in through_views)
    elif number < len(operand_bytes):
      read += operand_bytes[number]
  written = 0.0
  for output in outputs:
    if output.opcode == "dynamic-update-slice":
      update = fused.instructions.get(output.operands[1])
      written += update.bytes if update is not None else output.bytes
    else:
      written += output.bytes
  return read + written


def category(instruction: Instruction, flops: float) -> str:
  """Where a kernel belongs, from its op and the model code's names (``op_name``)."""
  name = instruction.op_name.lower()
  target = (instruction.attribute("custom_call_target") or "").lower()
  if ("fmha" in target or "dot_product_attention" in name
      or ("pallas_call" in name and "attention" in name)):
    return "attention"
  if flops > 0:
    return "matmul"
  if any(n in name for n in ("rng_bit_generator", "dropout", "bernoulli", "threefry", "random")):
    return "dropout masks"
  if "jvp" not in name and "transpose(" not in name:
    return "optimizer and metrics (outside forward and backward)"
  if "while/body" in name or "closed_call" in name or "token_terms" in name:
    return "loss (elementwise)"
  if "norm" in name:
    return "norms"
  if "mlp" in name:
    return "mlp (elementwise)"
  if "attention" in name:
    return "attention (elementwise)"
  return "other"


def kernels(text: str) -> list[Kernel]:
  """Every kernel launch of the entry computation (loop bodies expanded)."""
  computations = parse_module(text)
  entry = next(c for c in computations.values() if c.is_entry)
  found: list[Kernel] = []

  def visit(computation: Computation, count: int, seen: frozenset[str]) -> None:
    for instruction in computation.instructions.values():
      if instruction.opcode in FREE_OPS:
        continue
      if instruction.opcode == "while":
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', instruction.attributes)
        if trips is None:
          raise ValueError(f"{instruction.name}: a while loop without a known trip count")
        for key, times in (("body", int(trips.group(1))), ("condition", int(trips.group(1)) + 1)):
          callee = instruction.attribute(key)
          if callee in computations and callee not in seen:
            visit(computations[callee], count * times, seen | {callee})
        continue
      if instruction.opcode in ("call", "conditional", "async-start"):
        for callee in re.findall(r"(?:to_apply|calls|branch_computations=\{)[=]?(%[A-Za-z0-9_.\-]+)",
                                 instruction.attributes):
          if callee in computations and callee not in seen:
            visit(computations[callee], count, seen | {callee})
        continue
      if instruction.opcode == "fusion":
        flops = _computation_flops(instruction.attribute("calls") or "", computations)
        moved = _fusion_bytes(instruction, computation, computations)
      else:
        flops = (_custom_call_flops(instruction, computation)
                 if instruction.opcode == "custom-call" else
                 _dot_flops(instruction, computation) if instruction.opcode == "dot" else 0.0)
        moved = instruction.bytes + sum(
            computation.instructions[o].bytes for o in instruction.operands
            if o in computation.instructions)
      found.append(Kernel(instruction.name, instruction.opcode, instruction.op_name,
                          category(instruction, flops), moved, flops, count))

  visit(entry, 1, frozenset({entry.name}))
  return found


def summarize(found: Iterable[Kernel], peak_tflops: float, hbm_tb_s: float,
              top: int = 15) -> dict[str, Any]:
  """Per-category totals and the costliest kernels that are not matmuls."""
  peak, bandwidth = peak_tflops * 1e12, hbm_tb_s * 1e12
  found = list(found)
  by_category: dict[str, dict[str, float]] = {}
  for kernel in found:
    row = by_category.setdefault(kernel.category, dict(kernels=0, gigabytes=0.0, tflop=0.0,
                                                       roofline_ms=0.0))
    row["kernels"] += kernel.count
    row["gigabytes"] += kernel.count * kernel.bytes / 1e9
    row["tflop"] += kernel.count * kernel.flops / 1e12
    row["roofline_ms"] += 1e3 * kernel.seconds(peak, bandwidth)
  ordered = dict(sorted(by_category.items(), key=lambda item: -item[1]["roofline_ms"]))
  costly = sorted((k for k in found if k.category != "matmul"),
                  key=lambda k: -k.seconds(peak, bandwidth))[:top]
  return {
      "peak_tflops": peak_tflops, "hbm_tb_s": hbm_tb_s,
      "kernels": sum(k.count for k in found),
      "roofline_ms": sum(row["roofline_ms"] for row in ordered.values()),
      "tflop": sum(row["tflop"] for row in ordered.values()),
      "gigabytes": sum(row["gigabytes"] for row in ordered.values()),
      "categories": ordered,
      "costliest_other_kernels": [
          dict(name=k.name, category=k.category, op_name=k.op_name, count=k.count,
               megabytes=k.bytes / 1e6, roofline_ms=1e3 * k.seconds(peak, bandwidth))
          for k in costly],
  }


def markdown(summary: dict[str, Any]) -> str:
  lines = [f"Roofline at {summary['peak_tflops']:g} TFLOP/s and {summary['hbm_tb_s']:g} TB/s: "
           f"**{summary['roofline_ms']:.1f} ms** over {summary['kernels']} kernel launches "
           f"({summary['tflop']:.1f} TFLOP, {summary['gigabytes']:.1f} GB moved).", "",
           "| category | kernels | GB moved | TFLOP | roofline ms |", "|---|---|---|---|---|"]
  for name, row in summary["categories"].items():
    lines.append(f"| {name} | {row['kernels']} | {row['gigabytes']:.1f} | {row['tflop']:.2f} "
                 f"| {row['roofline_ms']:.2f} |")
  lines += ["", "| costliest kernels other than matmuls | category | launches | MB each "
            "| roofline ms |", "|---|---|---|---|---|"]
  for k in summary["costliest_other_kernels"]:
    lines.append(f"| `{k['op_name'] or k['name']}` | {k['category']} | {k['count']} "
                 f"| {k['megabytes']:.0f} | {k['roofline_ms']:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("hlo", help="optimized HLO text (compiled.as_text())")
  parser.add_argument("--peak_tflops", type=float, default=989.0,
                      help="dense bf16 matmul rate (989: H100/H200 SXM datasheet)")
  parser.add_argument("--hbm_tb_s", type=float, default=4.8, help="memory bandwidth (H200: 4.8)")
  parser.add_argument("--top", type=int, default=15)
  parser.add_argument("--json", action="store_true", help="print the summary as JSON")
  args = parser.parse_args(argv)
  with open(args.hlo) as f:
    summary = summarize(kernels(f.read()), args.peak_tflops, args.hbm_tb_s, args.top)
  print(json.dumps(summary, indent=1) if args.json else markdown(summary), end="")


if __name__ == "__main__":
  main()
