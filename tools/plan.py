r"""Will it fit? Compiles a stage's train step ahead of time for a target and reports per device.

  python tools/plan.py --config=configs/pretrain.py:gpt2_124m --target=cpu:8 --memory_gib=80
  python tools/plan.py --config=configs/pretrain.py:1b --target=v5e-16        # needs pip install -e ".[tpu]"
  python tools/plan.py --config=configs/sft.py:tiny --target=cpu:8 --json --config.mesh.fsdp=2

Prints, for the step: peak memory per device against the target's memory and the verdict
(fits / does not fit, with the margin; exit status 1 when it does not fit), FLOPs per device as XLA counts them beside the model's
FLOPs formula, and the collectives (count and bytes by kind). Nothing runs: the step is lowered
with abstract inputs and compiled for the target's devices (`jaxlm/plan.py`). `--config.<key>=`
overrides work as on the stage's command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="a stage config and preset, e.g. configs/pretrain.py:1b")
  parser.add_argument("--target", required=True, help="cpu:<N> or a TPU slice (v5e-8, v5e-16, v5p-8, v4-8, v6e-8)")
  parser.add_argument("--memory_gib", type=float, default=None,
                      help="memory per device to plan against (default: the target's; cpu: none)")
  parser.add_argument("--vocab_size", type=int, default=0, help="the tokenizer's vocabulary (0: the config's)")
  parser.add_argument("--json", action="store_true", help="print the report as JSON")
  parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
  return parser.parse_known_args(argv)


def main(argv=None) -> int:
  args, overrides = _parse_args(argv)
  if args.target.startswith("cpu:"):  # Before JAX starts: XLA reads the flag once.
    count = args.target.split(":", 1)[1]
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
  # Nothing runs here: compiling for a TPU topology needs libtpu's compiler, not a TPU backend.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from jaxlm import cli, errors, model as model_lib, plan, stage  # pylint: disable=import-outside-toplevel

  def run() -> int:
    config = cli.load_config(args.config, overrides)
    vocab = args.vocab_size or (config.tokenizer.vocab_size if "tokenizer" in config else config.model.vocab_size)
    target = plan.get_target(args.target, memory_gib=args.memory_gib)
    report = plan.plan_train_step(config, target, vocab_size=vocab)
    model_config = stage.model_config(config.model, vocab_size=vocab)
    tokens = config.batch_size * config.seq_len * config.steps_per_call
    formula = model_lib.flops_per_token(model_config, config.seq_len, causal=True) * tokens / len(target.devices)
    if args.json:
      print(json.dumps({"target": target.name, "devices": target.description, "config": args.config,
                        "formula_flops_per_device": formula, **report.to_dict()}, indent=2))
      return 0 if report.fits is not False else 1
    gib = lambda b: f"{b / plan.GIB:.2f} GiB"
    limit = gib(target.memory_per_device) if target.memory_per_device else "no limit given"
    verdict = ("no verdict (give --memory_gib)" if report.fits is None else
               f"fits, {gib(report.margin_bytes)} to spare" if report.fits else
               f"DOES NOT FIT: {gib(-report.margin_bytes)} over")
    print(f"{args.config} on {target.name} ({target.description}), mesh {dict(config.mesh)}")
    print(f"{report.program}: peak {gib(report.peak_bytes)} per device of {limit}: {verdict}")
    if report.compiler_refused:
      print(f"  the compiler refused it: {report.compiler_refused}")
      return 1
    print(f"  arguments {gib(report.argument_bytes)}, outputs {gib(report.output_bytes)}, "
          f"donated {gib(report.alias_bytes)}, temporaries {gib(report.temp_bytes)}")
    loops = f" (lower bound: {report.loops} loop bodies counted once)" if report.loops else ""
    print(f"  FLOPs per device: {report.flops:.3e} as compiled{loops}; {formula:.3e} by the model formula")
    for kind, (count, size) in sorted(report.collectives.items()):
      print(f"  {kind}: {count} x, {size / 2**20:.1f} MiB")
    return 0 if report.fits is not False else 1

  return errors.guard(run)()


if __name__ == "__main__":
  sys.exit(main())
