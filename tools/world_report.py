r"""The headroom of the synthetic world, as a markdown table, and example records of each kind.

The table says what each stage can win on the gold-reward scale (`jaxlm.data.world_reward`):
imitating the demonstrations reaches about ``demo reward``, the best style reaches ``best
reward`` (2.5), and no reward model can agree with gold more often than the noisy labels do
(``label agreement``). Then it prints per-style rewards, a few records of each kind, a few
fact probes, and optionally how long generating the whole world takes.

  python tools/world_report.py                        # default world, 1000 records per split
  python tools/world_report.py --seed=1 --num=300 --examples=3
  python tools/world_report.py --time                 # also time generating every kind and split
  python tools/world_report.py --label_temperature=0.3 --num_chats=5000
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import textwrap
import time

try:
  import jaxlm  # noqa: F401
except ImportError:  # Run from a checkout without `pip install -e .`.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxlm import errors
from jaxlm.data import world
from jaxlm.data import world_reward


def _parse(argv):
  defaults = world.WorldConfig()
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seed", type=int, default=defaults.seed)
  parser.add_argument("--num", type=int, default=1000,
                      help="records of each kind per split for the table")
  parser.add_argument("--examples", type=int, default=2, help="example records printed per kind")
  for field in dataclasses.fields(world.WorldConfig):
    if field.name != "seed":
      parser.add_argument(f"--{field.name}", type=type(field.default), default=field.default)
  parser.add_argument("--time", action="store_true", help="time generating every kind and split")
  return parser.parse_args(argv)


def headroom_table(report: dict) -> str:
  """The markdown table of `world.headroom_report`."""
  rows = ["| split | demo reward | demo correct | best reward | headroom (best - demo) "
          "| label agreement (expected) | demo turns / prompts / pairs |",
          "|---|---|---|---|---|---|---|"]
  for split, r in report.items():
    rows.append(f"| {split} | {r['demo_reward']:.3f} | {r['demo_correct']:.1%} "
                f"| {r['best_reward']:.3f} | {r['headroom']:.3f} "
                f"| {r['label_agreement']:.1%} ({r['label_agreement_expected']:.1%}) "
                f"| {r['num_demo_turns']} / {r['num_prompts']} / {r['num_preferences']} |")
  return "\n".join(rows)


def style_table(report: dict) -> str:
  """Mean gold reward of each response style on the prompt records, per split."""
  styles = world.STYLES
  rows = ["| split | " + " | ".join(styles) + " |", "|---|" + "---|" * len(styles)]
  for split, r in report.items():
    rows.append(f"| {split} | " + " | ".join(f"{r['style_reward'][s]:.2f}" for s in styles) + " |")
  return "\n".join(rows)


def _messages(messages) -> str:
  return "\n".join(f"    {m['role']}: {m['content']}" for m in messages)


def _show(kind: str, i: int, record: dict) -> str:
  """One record as indented text, with the metadata that matters for its stage."""
  if kind == "text":
    return f"[{i}]\n" + textwrap.indent(record["text"], "    ")
  m = record["meta"]
  if kind == "chat":
    answers = [x["content"] for x in record["messages"] if x["role"] == "assistant"]
    golds = [world_reward.gold_reward(world.prompt_record_from_chat(record, k), a)
             for k, a in enumerate(answers)]
    turns = ", ".join(f"{s} -> {g:.2f}" for s, g in zip(m["styles"], golds))
    return f"[{i}] assistant turns (style -> gold): {turns}\n" + _messages(record["messages"])
  if kind == "prompt":
    return (f"[{i}] {m['family']} about {m['subject']!r}, answer {m['answer']!r}, "
            f"template {m['template']}, held-out template/subject: "
            f"{m['heldout_template']}/{m['heldout_subject']}\n" + _messages(record["prompt"]))
  return "\n".join([
      f"[{i}] label agrees with gold: {m['label_agrees_gold']} (p={m['p_label']:.2f})",
      _messages(record["prompt"]),
      f"    chosen   ({m['style_chosen']}, gold {m['gold_chosen']:.2f}): {record['chosen']}",
      f"    rejected ({m['style_rejected']}, gold {m['gold_rejected']:.2f}): {record['rejected']}"])


def _examples(config: world.WorldConfig, n: int) -> str:
  out = []
  for kind in ("text", "chat", "prompt", "preference"):
    out.append(f"\n## {kind} (validation)\n")
    out += [_show(kind, i, r) for i, r in zip(range(n), world.generate(kind, "validation", config))]
  probes = world.fact_probes("validation", config)
  out.append("\n## fact probes (validation)\n")
  for p in probes[::max(1, len(probes) // (3 * n))][:3 * n]:
    out.append(f"    {p['prefix']!r} -> {p['answer']!r}  ({p['family']}, held out: {p['heldout']})")
  return "\n".join(out)


def _timing(config: world.WorldConfig) -> str:
  rows = ["| kind | split | records | MB | seconds |", "|---|---|---|---|---|"]
  total = 0.0
  for kind in ("text", "chat", "preference", "prompt"):
    for split in world.SPLITS:
      start = time.perf_counter()
      count = size = 0
      for record in world.generate(kind, split, config):
        count += 1
        size += len(record["text"].encode("utf-8")) if kind == "text" else 0
      seconds = time.perf_counter() - start
      total += seconds
      megabytes = f"{size / 1e6:.2f}" if kind == "text" else "-"
      rows.append(f"| {kind} | {split} | {count} | {megabytes} | {seconds:.2f} |")
  return "\n".join(rows) + f"\n\nGenerating everything took {total:.1f} s."


def main(argv=None) -> None:
  args = _parse(argv)
  fields = [f.name for f in dataclasses.fields(world.WorldConfig)]
  config = world.WorldConfig(**{name: getattr(args, name) for name in fields})
  print(f"# Synthetic world {world.WORLD_VERSION}, fingerprint {config.fingerprint()}\n")
  print(f"{config}\n")
  start = time.perf_counter()
  report = world.headroom_report(config, num_per_split=args.num)
  seconds = time.perf_counter() - start
  print(f"## Headroom ({args.num} records of each kind per split, {seconds:.1f} s)\n")
  print(headroom_table(report))
  print("\n## Mean gold reward per response style (on the prompt records)\n")
  print(style_table(report))
  if args.examples > 0:
    print(_examples(config, args.examples))
  if args.time:
    print("\n## Generation time at these sizes\n")
    print(_timing(config))


if __name__ == "__main__":
  errors.guard(main)()
