r"""FLOPs and collectives per execution of a compiled program, read from its optimized HLO.

`hlo_stats(compiled.as_text())` (or `stats_of(compiled)`) walks the program as it will run:
every instruction is counted as many times as its computation executes, so a `lax.scan` of n
layers counts its body n times. XLA's own `compiled.cost_analysis()` counts a while loop's
body once (and is missing on deviceless GPU compiles), so for a program with scanned layers,
microbatches or steps per call it is a lower bound; here each loop body counts its trip
count times. Figures are per device (one SPMD program) and per call of the jitted function.

The math. For one execution of the entry computation,

    executed FLOPs = sum over dot / convolution instructions i of  m(i) x flops(i)

where m(i), the multiplicity of i's computation, is the product of the counts along its
call chain from ENTRY:

* a `while` body runs n times and its condition n + 1. n is the trip count XLA proved and wrote
  in the loop's `backend_config` (`"known_trip_count":{"n":"..."}`: XLA's CPU pipeline does,
  and GPU's runs the same annotator). The TPU compiler does not write it, so otherwise n is read off the loop the way XLA's
  while-loop analysis does: a counter, element k of the loop's tuple, that starts at a
  constant (followed through copies, tuples and the arguments of a `call`), is stepped by a
  constant in the body (`add`/`subtract`, inside a fusion or not) and compared with a constant
  in the condition (LT, LE, GT, GE, NE). Every `lax.scan` and `fori_loop` with static bounds
  has that form. A loop without it (a `while_loop` on data) is counted ONCE and reported in
  `unknown_trip_counts`: the result is then a lower bound (`exact` False);
* a fusion's `calls=`, a `call`'s `to_apply`, an async wrapper (`async-start`'s `calls=`, the
  `-update`/`-done` halves not again), a custom call's `called_computations` run once per
  execution of the instruction;
* a `conditional` runs one of its branches: the branch with the most FLOPs is counted (with its
  collectives), so with branches of unequal cost this is an upper bound of one execution;
  `conditionals` says how many there are;
* `to_apply` of reductions, all-reduce, scatter, sort, map, select-and-scatter and reduce-window
  are scalar combiners (no dots, no collectives) and are not walked.

and flops(i) is XLA's multiply-add count times 2:

* `dot`: 2 x prod(result dims) x prod(lhs contracting dims). Batch and free dimensions are in
  the result; each result element is one inner product over the contracting dimensions.
* `convolution`: 2 x (lhs features / feature_group_count) x result features x (lhs batch /
  batch_group_count) x prod over spatial dimensions of the (output position, kernel position)
  pairs that land on a real input element (not padding, not a hole of `lhs_dilate`), as XLA's
  `HloCostAnalysis` counts it. XLA's TPU compiler rewrites batched dot_generals (attention's
  per-head matmuls) into convolutions whose batch dimension is a padded / dilated window
  (`window={size=4 pad=3_3 rhs_reversal=1}`): only the diagonal positions are real, and counting
  the whole window would count the heads squared.
* a cuBLAS GEMM custom call (GPU): as a dot, its dimension numbers read from `backend_config`;
* a kernel custom call (Pallas on TPU `tpu_custom_call`, cuDNN attention `__cudnn$...`, Triton
  or Mosaic GPU kernels): the `flops` of the cost estimate the kernel declares
  (`pl.pallas_call(cost_estimate=...)`, written into its `backend_config`), else unknown: such
  calls are counted in `opaque_kernels` (by custom-call target, times executed) and left out of
  `flops`, which is then a lower bound (e.g. splash attention, which declares none).

Elementwise work (norms, softmax, the optimizer update, casts) is not counted: it is a few
percent of a transformer step and it is what MFU's convention leaves out too.

Collectives (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute, and
ragged-all-to-all / collective-broadcast when present) are counted the same way, m(i) per
instruction, with the bytes of their result (a tuple result: the sum of its arrays). An async
pair (`all-gather-start` / `all-gather-done`) is one collective: it is counted at its `-done`,
whose result is the collective's output alone (the `-start` tuple also holds the operand).

Optimized HLO prints operands as bare names (`dot(%a, %b)`) on CPU, TPU and GPU; older printers
wrote their types inline (`dot(f32[4,16]{1,0} %a, ...)`): both are read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from typing import Any

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_EXTRA_COLLECTIVES = ("ragged-all-to-all", "collective-broadcast")
_ALL_COLLECTIVES = COLLECTIVES + _EXTRA_COLLECTIVES
_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul", "__cublas$lt$matmul$f8")
# Custom calls that run a compute kernel of their own (others allocate, annotate or reshard).
_KERNEL_TARGETS = re.compile(r"^(tpu_custom_call|__cudnn\$.*|__gpu\$xla\.gpu\.triton|triton_kernel_call|mosaic_gpu.*|"
                             r"__cublas\$.*)$")
_COST_FLOPS = re.compile(r'\\?"cost_estimate\\?"\s*:\s*\{[^{}]*?\\?"flops\\?"\s*:\s*\\?"?(\d+)')
# Opcodes whose `to_apply` is a scalar combiner, run per element, never holding dots.
_COMBINER_OPS = ("reduce", "all-reduce", "all-reduce-start", "reduce-scatter", "scatter", "sort", "map",
                 "select-and-scatter", "reduce-window", "reduce-precision")


@dataclasses.dataclass(frozen=True)
class HloStats:
  """Per execution of a compiled program (one call of the jitted function, on one device).

  Attributes:
    flops: executed dot + convolution FLOPs (loop bodies times their trip counts).
    flops_once: the same with every instruction counted once, loops or not (what XLA's
      cost_analysis does with loops; its figure also holds elementwise FLOPs).
    collectives: kind -> (count, result bytes), executed (a loop body's times its trip count).
    collectives_once: kind -> (count, result bytes), every instruction once.
    dots: dot / convolution / GEMM (and kernels declaring FLOPs) instructions in the program
      text (reachable from ENTRY).
    loops: while loops in the program text (reachable from ENTRY).
    unknown_trip_counts: of those, loops whose trip count XLA did not prove: each counted once,
      so `flops` and `collectives` are lower bounds.
    conditionals: conditional instructions (their costliest branch is counted).
    opaque_kernels: custom-call target -> executed calls of kernels whose FLOPs are unknown
      (no cost estimate): left out of `flops`.
  """

  flops: float
  flops_once: float
  collectives: dict[str, tuple[int, int]]
  collectives_once: dict[str, tuple[int, int]]
  dots: int
  loops: int
  unknown_trip_counts: int
  conditionals: int
  opaque_kernels: dict[str, int] = dataclasses.field(default_factory=dict)

  @property
  def exact(self) -> bool:
    """True when every loop's trip count and every kernel's FLOPs are known (conditionals aside);
    else `flops` is a lower bound."""
    return self.unknown_trip_counts == 0 and not self.opaque_kernels

  @property
  def collective_bytes(self) -> int:
    """Executed result bytes of all collectives together."""
    return sum(b for _, b in self.collectives.values())

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    for key in ("collectives", "collectives_once"):
      out[key] = {k: {"count": c, "bytes": b} for k, (c, b) in getattr(self, key).items()}
    out["exact"] = self.exact
    return out


# ------------------------------------------------------------------------------------------------
# Parsing.
# ------------------------------------------------------------------------------------------------
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*)?\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


@dataclasses.dataclass
class _Instruction:
  name: str
  type: str
  opcode: str
  operands: list[tuple[str, str | None]]  # (name, inline type or None)
  attrs: str  # the attributes with string literals blanked (metadata, backend_config)
  line: str


def _balanced(text: str, start: int) -> int:
  """The index just past the bracket group opening at text[start] ('(', '{' or '['), skipping
  quoted strings."""
  depth = 0
  i = start
  while i < len(text):
    ch = text[i]
    if ch == '"':
      match = _STRING.match(text, i)
      i = match.end() if match else i + 1
      continue
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
      if depth == 0:
        return i + 1
    i += 1
  return len(text)


def _split_top(text: str) -> list[str]:
  """`text` split at its top-level commas."""
  parts, depth, current = [], 0, []
  for ch in text:
    if ch in "({[":
      depth += 1
    elif ch in ")}]":
      depth -= 1
    if ch == "," and depth == 0:
      parts.append("".join(current))
      current = []
    else:
      current.append(ch)
  if "".join(current).strip():
    parts.append("".join(current))
  return [p.strip() for p in parts]


def _parse_instruction(line: str) -> _Instruction | None:
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  name, rest = match.groups()
  rest = rest.lstrip()
  if rest.startswith("("):  # A tuple type: `(f32[2], /*index=5*/bf16[4]) op(...)`.
    end = _balanced(rest, 0)
  else:
    end = rest.find(" ")
    if end < 0:
      return None
  type_text, rest = rest[:end], rest[end:].lstrip()
  op_match = re.match(r"([\w\-$.]+)\(", rest)
  if not op_match:
    return None
  opcode = op_match.group(1)
  close = _balanced(rest, op_match.end() - 1)
  operands = []
  for operand in _split_top(rest[op_match.end():close - 1]):
    operand = re.sub(r"/\*.*?\*/", "", operand).strip()
    if not operand:
      continue
    pieces = operand.rsplit(" ", 1)
    operand_name = pieces[-1].lstrip("%")
    operands.append((operand_name, pieces[0] if len(pieces) == 2 else None))
  return _Instruction(name=name, type=type_text, opcode=opcode, operands=operands,
                      attrs=_STRING.sub('""', rest[close:]), line=line)


def _parse_module(text: str) -> tuple[dict[str, list[_Instruction]], str]:
  """{computation name: its instructions}, the ENTRY computation's name."""
  computations: dict[str, list[_Instruction]] = {}
  entry, current = None, None
  for line in text.splitlines():
    if current is None:
      header = _HEADER.match(line) if line and not line[0].isspace() else None
      if header and not line.startswith("HloModule"):
        current = header.group(2)
        computations[current] = []
        if header.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    instruction = _parse_instruction(line)
    if instruction:
      computations[current].append(instruction)
  if entry is None and not computations:  # Bare instruction lines (a snippet): one computation.
    entry = "__entry__"
    computations[entry] = [i for i in map(_parse_instruction, text.splitlines()) if i]
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text (expected `compiled.as_text()`)")
  return computations, entry


def _dims(type_text: str) -> list[int]:
  """The dimensions of an array type `bf16[64,128]{1,0:T(8,128)}` (dynamic `<=N` read as N)."""
  match = _SHAPE.search(type_text)
  if not match:
    return []
  return [int(re.sub(r"\D", "", d)) for d in match.group(2).split(",") if re.sub(r"\D", "", d)]


def _bytes(type_text: str) -> int:
  """Bytes of an array or tuple type: every `dtype[dims]` in it (token and opaque types: 0)."""
  total = 0.0
  for dtype, dims in _SHAPE.findall(type_text):
    bits = 8 if dtype == "pred" else re.search(r"(\d+)", dtype)
    if bits is None:
      continue
    bits = bits if isinstance(bits, int) else int(bits.group(1))
    count = math.prod(int(re.sub(r"\D", "", d)) for d in dims.split(",") if re.sub(r"\D", "", d))
    total += bits / 8 * count
  return int(math.ceil(total))


def _int_list(attrs: str, key: str) -> list[int]:
  match = re.search(rf"\b{key}=\{{([\d,\s]*)\}}", attrs)
  return [int(x) for x in match.group(1).split(",") if x.strip()] if match else []


def _int_attr(attrs: str, key: str, default: int) -> int:
  match = re.search(rf"\b{key}=(\d+)", attrs)
  return int(match.group(1)) if match else default


def _dot_flops(instruction: _Instruction, lhs_type: str) -> float:
  lhs = _dims(lhs_type)
  contracting = math.prod(lhs[d] for d in _int_list(instruction.attrs, "lhs_contracting_dims"))
  return 2.0 * math.prod(_dims(instruction.type)) * contracting


def _gemm_flops(instruction: _Instruction, lhs_type: str) -> float:
  """A cuBLAS GEMM custom call: a dot whose dimension numbers are in backend_config."""
  start = instruction.line.find("backend_config={")
  try:
    config, _ = json.JSONDecoder().raw_decode(instruction.line, start + len("backend_config="))
    numbers = config["gemm_backend_config"]["dot_dimension_numbers"]
  except (ValueError, KeyError, TypeError):
    return 0.0
  lhs = _dims(lhs_type)
  contracting = math.prod(lhs[int(d)] for d in numbers.get("lhs_contracting_dimensions", []))
  result = instruction.type
  if result.startswith("("):  # (output, workspace)
    result = _split_top(result[1:-1])[0]
  return 2.0 * math.prod(_dims(result)) * contracting


def _window(attrs: str, rank: int) -> list[dict[str, int]]:
  """The `window={size=4 stride=3 pad=3_3 lhs_dilate=4 rhs_dilate=1 rhs_reversal=1}` per spatial dim."""
  dims = [dict(size=1, stride=1, pad_low=0, pad_high=0, lhs_dilate=1, rhs_dilate=1) for _ in range(rank)]
  match = re.search(r"\bwindow=\{([^}]*)\}", attrs)
  if not match:
    return dims
  for field in match.group(1).split():
    key, _, value = field.partition("=")
    values = value.split("x")
    for i, v in enumerate(values[:rank]):
      if key == "pad":
        low, _, high = v.partition("_")
        dims[i]["pad_low"], dims[i]["pad_high"] = int(low), int(high)
      elif key in ("size", "stride", "lhs_dilate", "rhs_dilate"):
        dims[i][key] = int(v)
  return dims


def _valid_positions(input_size: int, kernel_size: int, output_size: int, w: dict[str, int]) -> int:
  """(output, kernel) position pairs of one spatial dimension that read a real input element."""
  outputs = np.arange(output_size, dtype=np.int64) * w["stride"] - w["pad_low"]
  count = 0
  for k in range(kernel_size):
    undilated = outputs + k * w["rhs_dilate"]  # the input position in the padded, dilated input
    real = (undilated % w["lhs_dilate"] == 0) & (undilated >= 0) & (undilated // w["lhs_dilate"] < input_size)
    count += int(real.sum())  # not padding, not a hole of the base (lhs) dilation
  return count


def _conv_flops(instruction: _Instruction, lhs_type: str, rhs_type: str) -> float:
  labels = re.search(r"\bdim_labels=([\w]+)_([\w]+)->([\w]+)", instruction.attrs)
  if not labels:
    return 0.0
  lhs_labels, rhs_labels, out_labels = labels.groups()
  lhs, rhs, out = _dims(lhs_type), _dims(rhs_type), _dims(instruction.type)
  spatial = sorted({c for c in lhs_labels if c.isdigit()}, key=int)
  window = _window(instruction.attrs, len(spatial))
  positions = 1
  for i, s in enumerate(spatial):
    positions *= _valid_positions(lhs[lhs_labels.index(s)], rhs[rhs_labels.index(s)], out[out_labels.index(s)],
                                  window[i])
  features = lhs[lhs_labels.index("f")] // _int_attr(instruction.attrs, "feature_group_count", 1)
  batch = lhs[lhs_labels.index("b")] // _int_attr(instruction.attrs, "batch_group_count", 1)
  return 2.0 * features * out[out_labels.index("f")] * batch * positions


def _callees(instruction: _Instruction) -> list[tuple[str, str]]:
  """(role, computation) of the computations an instruction runs."""
  op, attrs = instruction.opcode, instruction.attrs
  if op.endswith("-done") or op.endswith("-update"):
    return []  # The async wrapper's computation runs once, counted at its -start.
  out = []
  for role, single, several in re.findall(
      r"\b(calls|to_apply|body|condition|true_computation|false_computation|branch_computations|"
      r"called_computations)=(?:%?([\w.\-]+)|\{([^}]*)\})", attrs):
    if role == "to_apply" and op in _COMBINER_OPS:
      continue
    names = [single] if single else [n.strip().lstrip("%") for n in several.split(",") if n.strip()]
    out += [(role, name) for name in names]
  return out


@dataclasses.dataclass
class _Totals:
  flops: float = 0.0
  collectives: dict[str, list[int]] = dataclasses.field(default_factory=dict)
  opaque: dict[str, int] = dataclasses.field(default_factory=dict)

  def add(self, other: "_Totals", times: int) -> None:
    self.flops += times * other.flops
    for target, count in other.opaque.items():
      self.opaque[target] = self.opaque.get(target, 0) + times * count
    for kind, (count, size) in other.collectives.items():
      mine = self.collectives.setdefault(kind, [0, 0])
      mine[0] += times * count
      mine[1] += times * size


class _Values:
  """Symbolic values of scalar instructions, enough to read a loop counter off the HLO.

  A value is ("const", int), ("gte", k) (element k of the computation's tuple parameter),
  ("add", a, b), ("sub", a, b), ("cmp", direction, a, b), or None (anything else).
  """

  def __init__(self, computations: dict[str, list[_Instruction]]):
    self.computations = computations
    self.by_name = {c: {i.name: i for i in instructions} for c, instructions in computations.items()}
    # Computations run by a call (or a fusion, an async wrapper) from exactly one place: their
    # parameters are that instruction's operands (a loop's initial counter may come from there).
    callers: dict[str, list[tuple[str, _Instruction]]] = {}
    for c, instructions in computations.items():
      for i in instructions:
        if i.opcode in ("call", "fusion", "async-start"):
          for _, callee in _callees(i):
            callers.setdefault(callee, []).append((c, i))
    self.caller = {callee: sites[0] for callee, sites in callers.items() if len(sites) == 1}

  def element(self, computation: str, name: str, k: int, depth: int = 0):
    """The value of element k of the tuple that instruction `name` produces."""
    instruction = self.by_name.get(computation, {}).get(name)
    if instruction is None or depth > 40:
      return None
    if instruction.opcode == "tuple" and k < len(instruction.operands):
      return self.of(computation, instruction.operands[k][0], depth=depth + 1)
    if instruction.opcode == "copy" and instruction.operands:
      return self.element(computation, instruction.operands[0][0], k, depth + 1)
    if instruction.opcode == "parameter" and computation in self.caller:
      caller_computation, call = self.caller[computation]
      index = int(instruction.operands[0][0])
      if index < len(call.operands):
        return self.element(caller_computation, call.operands[index][0], k, depth + 1)
    return None

  def root(self, computation: str) -> _Instruction | None:
    for instruction in self.computations.get(computation, []):
      if re.match(r"\s*ROOT\s", instruction.line):
        return instruction
    return None

  def of(self, computation: str, name: str, args=None, depth: int = 0):
    """The value of instruction `name`; `args(i)`: the value of parameter i of a fused computation."""
    instruction = self.by_name.get(computation, {}).get(name)
    if instruction is None or depth > 40:
      return None
    op, operands = instruction.opcode, instruction.operands
    sub = lambda i: self.of(computation, operands[i][0], args, depth + 1)
    if op == "constant":
      try:
        return ("const", int(operands[0][0])) if operands and not _dims(instruction.type) else None
      except ValueError:
        return None
    if op == "parameter":
      index = int(operands[0][0])
      if args:
        return args(index)
      if computation in self.caller and self.caller[computation][1].opcode != "fusion":
        caller_computation, call = self.caller[computation]
        return self.of(caller_computation, call.operands[index][0], depth=depth + 1) if index < len(
            call.operands) else None
      return ("param", index)
    if op in ("copy", "bitcast", "convert", "reshape") and operands:
      return sub(0)
    if op == "get-tuple-element":
      index = _int_attr(instruction.attrs, "index", -1)
      source = self.by_name[computation].get(operands[0][0])
      if source is not None and source.opcode == "tuple" and index < len(source.operands):
        return self.of(computation, source.operands[index][0], args, depth + 1)
      return ("gte", index) if sub(0) == ("param", 0) else None
    if op in ("add", "subtract") and len(operands) == 2:
      return ("add" if op == "add" else "sub", sub(0), sub(1))
    if op == "compare" and len(operands) == 2:
      direction = re.search(r"\bdirection=(\w+)", instruction.attrs)
      return ("cmp", direction.group(1) if direction else None, sub(0), sub(1))
    if op == "fusion":
      called = re.search(r"\bcalls=%?([\w.\-]+)", instruction.attrs)
      fused_root = self.root(called.group(1)) if called else None
      if fused_root is None:
        return None
      return self.of(called.group(1), fused_root.name,
                     lambda i: sub(i) if i < len(operands) else None, depth + 1)
    return None


def _known_trip_count(instruction: _Instruction) -> int | None:
  match = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)"?', instruction.line)
  return int(match.group(1)) if match else None


def _inferred_trip_count(values: _Values, computation: str, loop: _Instruction) -> int | None:
  """The trip count of `i = c0; while i < N: ...; i += s` (also <=, >, >=, !=), all constants."""
  condition = re.search(r"\bcondition=%?([\w.\-]+)", loop.attrs)
  body = re.search(r"\bbody=%?([\w.\-]+)", loop.attrs)
  cond_root = values.root(condition.group(1)) if condition else None
  body_root = values.root(body.group(1)) if body else None
  if cond_root is None or body_root is None or body_root.opcode != "tuple" or not loop.operands:
    return None
  test = values.of(condition.group(1), cond_root.name)
  if not test or test[0] != "cmp":
    return None
  _, direction, a, b = test
  flip = {"LT": "GT", "GT": "LT", "LE": "GE", "GE": "LE", "NE": "NE"}
  if a and a[0] == "const" and b and b[0] == "gte":
    a, b, direction = b, a, flip.get(direction)
  if not (a and a[0] == "gte" and b and b[0] == "const"):
    return None
  k, limit = a[1], b[1]
  if k >= len(body_root.operands):
    return None
  update = values.of(body.group(1), body_root.operands[k][0])
  step = None
  if update and update[0] == "add":
    terms = {update[1], update[2]} if None not in update[1:] else set()
    if ("gte", k) in terms and len(terms) == 2:
      (other,) = terms - {("gte", k)}
      step = other[1] if other[0] == "const" else None
  elif update and update[0] == "sub" and update[1] == ("gte", k) and update[2] and update[2][0] == "const":
    step = -update[2][1]
  if step in (None, 0):
    return None
  init = values.element(computation, loop.operands[0][0], k)
  if not init or init[0] != "const":
    return None
  start = init[1]
  if direction == "LT" and step > 0:
    return max(0, -(-(limit - start) // step))
  if direction == "LE" and step > 0:
    return max(0, -(-(limit + 1 - start) // step))
  if direction == "GT" and step < 0:
    return max(0, -(-(start - limit) // -step))
  if direction == "GE" and step < 0:
    return max(0, -(-(start + 1 - limit) // -step))
  if direction == "NE" and (limit - start) % step == 0 and (limit - start) // step >= 0:
    return (limit - start) // step
  return None


def hlo_stats(hlo_text: str) -> HloStats:
  """Executed FLOPs and collectives of optimized HLO text (`compiled.as_text()`); see the module doc."""
  computations, entry = _parse_module(hlo_text)
  values = _Values(computations)
  trip_counts: dict[tuple[str, str], int | None] = {}

  def trip_count(computation: str, instruction: _Instruction) -> int | None:
    key = (computation, instruction.name)
    if key not in trip_counts:
      known = _known_trip_count(instruction)
      trip_counts[key] = known if known is not None else _inferred_trip_count(values, computation, instruction)
    return trip_counts[key]

  static = dict(dots=0, loops=0, unknown=0, conditionals=0)
  seen: set[str] = set()

  def own(name: str) -> _Totals:
    """The computation's own instructions, each once (no callees)."""
    totals = _Totals()
    types = {i.name: i.type for i in computations[name]}
    first = name not in seen
    seen.add(name)

    def operand_type(instruction: _Instruction, index: int) -> str:
      operand, inline = instruction.operands[index]
      return inline or types.get(operand, "")

    for instruction in computations[name]:
      op = instruction.opcode
      flops = 0.0
      if op == "dot":
        flops = _dot_flops(instruction, operand_type(instruction, 0))
      elif op == "convolution":
        flops = _conv_flops(instruction, operand_type(instruction, 0), operand_type(instruction, 1))
      elif op == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', instruction.line)
        target = target.group(1) if target else ""
        estimate = _COST_FLOPS.search(instruction.line)
        if target in _GEMM_TARGETS:
          flops = _gemm_flops(instruction, operand_type(instruction, 0))
        elif estimate:
          flops = float(estimate.group(1))
        elif _KERNEL_TARGETS.match(target):
          totals.opaque[target] = totals.opaque.get(target, 0) + 1
      else:
        kind = op.removesuffix("-done")
        if kind in _ALL_COLLECTIVES and not op.endswith("-start"):
          entry_ = totals.collectives.setdefault(kind, [0, 0])
          entry_[0] += 1
          entry_[1] += _bytes(instruction.type)
      if first:
        static["dots"] += op in ("dot", "convolution") or (op == "custom-call" and flops > 0)
        static["loops"] += op == "while"
        static["unknown"] += op == "while" and trip_count(name, instruction) is None
        static["conditionals"] += op == "conditional"
      totals.flops += flops
    return totals

  @functools.lru_cache(maxsize=None)
  def walk(name: str, loops: bool) -> _Totals:
    totals = own(name)
    for instruction in computations[name]:
      callees = [(r, c) for r, c in _callees(instruction) if c in computations]
      if instruction.opcode == "conditional":
        branches = [walk(c, loops) for _, c in callees]
        if branches:
          totals.add(max(branches, key=lambda t: t.flops), 1)
        continue
      n = trip_count(name, instruction) if instruction.opcode == "while" else None
      for role, callee in callees:
        times = 1
        if loops and n is not None:
          times = n if role == "body" else n + 1 if role == "condition" else 1
        totals.add(walk(callee, loops), times)
    return totals

  executed, once = walk(entry, True), walk(entry, False)
  as_tuples = lambda c: {k: (int(n), int(b)) for k, (n, b) in sorted(c.items())}
  return HloStats(flops=executed.flops, flops_once=once.flops, collectives=as_tuples(executed.collectives),
                  collectives_once=as_tuples(once.collectives), dots=static["dots"], loops=static["loops"],
                  unknown_trip_counts=static["unknown"], conditionals=static["conditionals"],
                  opaque_kernels=dict(sorted(executed.opaque.items())))


def stats_of(compiled) -> HloStats:
  """`hlo_stats` of a compiled program (`jax.jit(f).lower(...).compile()`)."""
  return hlo_stats(compiled.as_text())
