r"""The README's preset table: every accelerator preset's stages planned for the hardware it names.

  pip install -e ".[tpu]"        # TPU targets
  python tools/plan_presets.py --targets=v5e-8,v5e-16,v5p-8 --out=plans.jsonl
  pip install -e ".[gpu-plan]"   # GPU targets (another environment is fine: rows are appended)
  python tools/plan_presets.py --targets=h100-80gb,h200,8xh100-80gb --out=plans.jsonl
  python tools/plan_presets.py --render --out=plans.jsonl        # the markdown table
  python tools/plan_presets.py --hf_models --out=hf_plans.jsonl  # imported models (HF_MODEL_TARGETS)

Each (preset, stage, target) of `PRESET_TARGETS` runs `tools/plan.py --json --no-suggest` in a
subprocess (one compile cache, memory returned after each) and appends its report to `--out`
as one JSON line; `--render` prints one table row per program: peak GiB per device / the
target's memory, and whether it fits.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("pretrain", "sft", "reward", "dpo", "ppo")
# What the README names each accelerator preset for.
PRESET_TARGETS = {"gpt2_124m": ("h100-80gb", "h200", "v5e-8"), "1b": ("8xh100-80gb", "v5e-16", "v5p-8")}


# Imported Hugging Face models (`tools/hf_configs/<name>.json`), planned from config.json alone
# with the `1b` preset's training settings (bf16 compute, remat, batch, FSDP over every device),
# for the stages that start from an imported model.
HF_MODEL_TARGETS = {"qwen2.5-0.5b": ("h100-80gb", "v5e-8"), "qwen2.5-1.5b": ("h100-80gb", "v5e-8"),
                    "llama3.1-8b": ("8xh100-80gb", "v5p-8")}
HF_MODEL_STAGES = ("sft", "dpo", "ppo")
HF_MODEL_PRESET = "1b"


def _plan(preset: str, stage: str, target: str, hf_model: str = "") -> dict:
  command = [sys.executable, os.path.join(ROOT, "tools", "plan.py"), f"--config=configs/{stage}.py:{preset}",
             f"--target={target}", "--json"]
  if hf_model:  # No preset was fitted to these: the planner's own fix, compiled to check, goes in the table.
    command.append(f"--hf_config={os.path.join('tools', 'hf_configs', hf_model + '.json')}")
  else:
    command.append("--no-suggest")
  start = time.perf_counter()
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  row = {"preset": hf_model or preset, "stage": stage, "target": target, "seconds": round(time.perf_counter() - start, 1)}
  if result.returncode not in (0, 1) or not result.stdout.strip():
    return {**row, "error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
  return {**row, **json.loads(result.stdout)}


def _render(rows: list[dict]) -> str:
  lines = ["| preset | stage | program | target | peak / memory per device | fits |", "|---|---|---|---|---|---|"]

  def verdict(program) -> str:
    if program["fits"]:
      return "yes"
    fix = program.get("suggestion")
    if not fix:
      return "**no**"
    flags = " ".join(f"`--config.{k}={v}`" for k, v in fix["overrides"].items())
    return f"with {flags}: {fix['peak_bytes'] / 2**30:.2f} GiB"

  for row in rows:
    if "error" in row:
      lines.append(f"| `{row['preset']}` | {row['stage']} | | {row['target']} | error: {row['error']} | |")
      continue
    for program in row["programs"]:
      peak, memory = program["peak_bytes"] / 2**30, program["memory_per_device"] / 2**30
      refused = " (compiler: temporaries alone)" if program["compiler_refused"] else ""
      lines.append(f"| `{row['preset']}` | {row['stage']} | {program['program'].split(' ', 1)[1]} | {row['target']} "
                   f"| {peak:.2f} / {memory:.2f} GiB{refused} | {verdict(program)} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--targets", default="", help="comma-separated targets to plan (default: all named)")
  parser.add_argument("--presets", default=",".join(PRESET_TARGETS))
  parser.add_argument("--stages", default=",".join(STAGES))
  parser.add_argument("--hf_models", action="store_true",
                      help="plan the imported Hugging Face models of HF_MODEL_TARGETS instead of the presets")
  parser.add_argument("--out", required=True, help="JSON lines file the reports are appended to")
  parser.add_argument("--render", action="store_true", help="print the table of --out and exit")
  args = parser.parse_args(argv)
  if args.render:
    with open(args.out) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    print(_render(rows))
    return 0
  wanted = set(filter(None, args.targets.split(",")))
  if args.hf_models:
    jobs = [(HF_MODEL_PRESET, stage, target, model) for model, targets in HF_MODEL_TARGETS.items()
            for stage in HF_MODEL_STAGES for target in targets]
  else:
    jobs = [(preset, stage, target, "") for preset in args.presets.split(",") for stage in args.stages.split(",")
            for target in PRESET_TARGETS[preset]]
  for preset, stage, target, hf_model in jobs:
    if wanted and target not in wanted:
      continue
    row = _plan(preset, stage, target, hf_model)
    with open(args.out, "a") as f:
      f.write(json.dumps(row) + "\n")
    verdicts = [p["fits"] for p in row.get("programs", [])]
    print(f"{hf_model or preset} {stage} {target}: {row.get('error') or verdicts} ({row['seconds']} s)", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
