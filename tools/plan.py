r"""Will it fit? Compiles a stage's programs ahead of time for a target and reports per device.

  python tools/plan.py --config=configs/pretrain.py:gpt2_124m --target=cpu:8 --memory_gib=80
  python tools/plan.py --config=configs/pretrain.py:1b --target=v5e-16        # pip install -e ".[tpu]"
  python tools/plan.py --config=configs/ppo.py:gpt2_124m --target=h200        # pip install -e ".[gpu-plan]"
  python tools/plan.py --config=configs/sft.py:tiny --target=cpu:8 --json --config.mesh.fsdp=2
  python tools/plan.py --config=configs/dpo.py:1b --target=8xh100-80gb --hf_config=tools/hf_configs/llama3.1-8b.json

Prints, for each program of the stage (train step; DPO's reference pass; PPO's sampler, scorer
and update): peak memory per device against the target's memory and the verdict (fits / does
not fit, with the margin; exit status 1 when any does not fit), FLOPs per device as executed
beside the model's formula, and the collectives (count and bytes by kind). A program that does
not fit gets the settings that make it fit, compiled to check (`--no-suggest` skips that).
Nothing runs: each program is lowered with abstract inputs and compiled for the target's
devices (`jaxlm/plan.py`). `--config.<key>=` overrides work as on the stage's command line.
`--hf_config` plans a Hugging Face model from its config.json alone (its shape, vocabulary and
options replace the preset's model; the preset keeps dtype, remat, attention, batch and mesh),
as a stage started from `tools/import_hf.py`'s run would have it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="a stage config and preset, e.g. configs/pretrain.py:1b")
  parser.add_argument("--target", required=True,
                      help="cpu:<N>, a TPU slice (v5e-8, v5e-16, v5p-8, v4-8, v6e-8) or GPUs (h100-80gb, a100-80gb, "
                           "h200, 8xh100-80gb, ...)")
  parser.add_argument("--memory_gib", type=float, default=None,
                      help="memory per device to plan against (default: the target's; cpu: none)")
  parser.add_argument("--vocab_size", type=int, default=0,
                      help="the tokenizer's vocabulary (0: the config's tokenizer.vocab_size, else model.vocab_size)")
  parser.add_argument("--hf_config", default="",
                      help="a Hugging Face model's config.json: plan that model instead of the preset's")
  parser.add_argument("--json", action="store_true", help="print the report as JSON")
  parser.add_argument("--program", default="",
                      help="plan only the programs whose name contains this, e.g. scorer, 'reference pass'")
  parser.add_argument("--suggest", action=argparse.BooleanOptionalAction, default=True,
                      help="when a program does not fit, find settings that make it fit and compile them to check")
  parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
  return parser.parse_known_args(argv)


def main(argv=None) -> int:
  args, overrides = _parse_args(argv)
  if args.target.startswith("cpu:"):  # Before JAX starts: XLA reads the flag once.
    count = args.target.split(":", 1)[1]
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
  # Nothing runs here: compiling for a TPU topology needs libtpu's compiler, not a TPU backend.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  # libtpu takes a process-wide lock file; deviceless compiles touch no chip, so several may run.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from jaxlm import cli, errors, plan  # pylint: disable=import-outside-toplevel

  def run() -> int:
    config = cli.load_config(args.config, overrides)
    if args.hf_config:
      config = plan.adopt_hf_config(config, args.hf_config)
    vocab = args.vocab_size or plan.default_vocab_size(config)
    target = plan.get_target(args.target, memory_gib=args.memory_gib)
    gib = lambda b: f"{b / plan.GIB:.2f} GiB"
    limit = gib(target.memory_per_device) if target.memory_per_device else "no limit given"
    devices = len(target.devices)
    rows, all_fit = [], True
    if not args.json:
      print(f"{args.config} on {target.name} ({target.description}), mesh {dict(config.mesh)}, vocab {vocab}")
    programs = plan.stage_programs(config, target, vocab_size=vocab)
    chosen = [p for p in programs if args.program in p.name]
    if not chosen:
      raise errors.UserError(f"--program={args.program!r} names none of {', '.join(p.name for p in programs)}")
    for program in chosen:
      report = plan.compile_program(program, target)
      fix = plan.suggest(config, target, program, vocab_size=vocab) if report.fits is False and args.suggest else None
      all_fit &= report.fits is not False
      rows.append({**report.to_dict(), "model_flops_per_device": report.model_flops / devices,
                   "suggestion": None if fix is None else {"overrides": fix.overrides, "cost": fix.cost,
                                                           "peak_bytes": fix.report.peak_bytes}})
      if args.json:
        continue
      verdict = ("no verdict (give --memory_gib)" if report.fits is None else
                 f"fits, {gib(report.margin_bytes)} to spare" if report.fits else
                 f"DOES NOT FIT: {gib(-report.margin_bytes)} over")
      print(f"{report.program}: peak {gib(report.peak_bytes)} per device of {limit}: {verdict}")
      if report.compiler_refused:
        print(f"  the compiler refused it: {report.compiler_refused}")
      else:
        print(f"  arguments {gib(report.argument_bytes)}, outputs {gib(report.output_bytes)}, "
              f"donated {gib(report.alias_bytes)}, temporaries {gib(report.temp_bytes)}")
        inexact = report.unknown_trip_counts or report.opaque_kernels
        note = (f" (a lower bound: {report.unknown_trip_counts} loops of unknown trip count, kernels without a "
                f"FLOPs estimate {report.opaque_kernels or 'none'})" if inexact else "")
        print(f"  FLOPs per device: {report.executed_flops:.3e} executed{note}, "
              f"{report.model_flops / devices:.3e} by the model formula "
              f"(XLA's cost analysis, loop bodies once: {report.xla_flops:.3e})")
        for kind, (count, size) in sorted(report.collectives.items()):
          print(f"  {kind}: {count} x, {size / 2**20:.1f} MiB")
      if report.fits is False and args.suggest:
        if fix is None:
          print(f"  no fix found by changing {', '.join(program.knob)}: use more devices or a smaller batch")
        else:
          flags = " ".join(f"--config.{k}={v}" for k, v in fix.overrides.items())
          print(f"  fits with {flags}: peak {gib(fix.report.peak_bytes)} (compiled and checked); cost: {fix.cost}")
    if args.json:
      print(json.dumps({"target": target.name, "devices": target.description, "config": args.config,
                        "vocab_size": vocab, "programs": rows}, indent=2))
    return 0 if all_fit else 1

  return errors.guard(run)()


if __name__ == "__main__":
  sys.exit(main())
