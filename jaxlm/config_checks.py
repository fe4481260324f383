"""Config values checked before anything runs: the sections every stage shares.

`check_common(config)` checks every key the stages share, wherever it is present (schedule,
batch, lengths, optimizer sections, model shape, mesh, data source string and options, eval),
and raises `errors.ConfigError` naming the key, the value and what was expected. Each stage's
`check_config` calls it first, then checks its own keys, all before the workdir is touched or the
tokenizer is trained; the pipeline runs every stage's `check_config` before its first stage.

Only the config is read here: nothing is opened, so a check takes microseconds. Requirements that
need the data (a judge for prompts without a gold reward) are the stage's, checked at start-up.
"""

from __future__ import annotations

from typing import Any, Iterable

from jaxlm import errors

SOURCE_PREFIXES = ("world", "text:", "jsonl:", "tfds:")
SCHEDULES = ("cosine", "linear", "constant")
LENGTH_POLICIES = ("truncate", "drop")
# Loop keys that must be positive integers when a stage has them.
POSITIVE_INTS = ("total_steps", "batch_size", "seq_len", "score_len", "log_every", "eval_every",
                 "checkpoint_every", "steps_per_call", "num_microbatches", "keep_checkpoints",
                 "max_prompt_len", "max_new_tokens", "rollout_batch", "sample_len")
NON_NEGATIVE_INTS = ("num_eval_batches", "num_probes", "num_samples")
OPTIMIZER_SECTIONS = ("optimizer", "policy_optimizer", "value_optimizer")


def get(config: Any, key: str) -> Any:
  """`config`'s value at the dotted `key` (KeyError if absent)."""
  value = config
  for part in key.split("."):
    value = value[part]
  return value


def has(config: Any, key: str) -> bool:
  try:
    get(config, key)
    return True
  except (KeyError, AttributeError, TypeError):
    return False


def _fail(key: str, value: Any, expected: str) -> None:
  raise errors.ConfigError(key, f"got {value!r}; expected {expected}")


def positive_int(config: Any, key: str) -> None:
  value = get(config, key)
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    _fail(key, value, "a positive integer")


def non_negative_int(config: Any, key: str) -> None:
  value = get(config, key)
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    _fail(key, value, "an integer >= 0")


def number_in(config: Any, key: str, low: float, high: float, *, low_open: bool = False,
              high_open: bool = False) -> None:
  """`config.key` is a number in [low, high] (an open end excludes it)."""
  value = get(config, key)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
  if not ok:
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    _fail(key, value, f"a number in {interval}")


def one_of(config: Any, key: str, choices: Iterable[Any]) -> None:
  value, choices = get(config, key), tuple(choices)
  if value not in choices:
    _fail(key, value, f"one of {', '.join(map(repr, choices))}")


def check_source(key: str, source: Any) -> None:
  """A source string's syntax (the files and datasets themselves are the data layer's to check)."""
  if not isinstance(source, str) or not source.strip():
    _fail(key, source, "a source string: world, text:<path or glob>, jsonl:<path or glob> or tfds:<name>")
  prefix, sep, rest = source.strip().partition(":")
  if prefix == "world" and not sep:
    return
  if prefix in ("text", "jsonl", "tfds") and sep and rest.strip():
    return
  _fail(key, source, "world, text:<path or glob>, jsonl:<path or glob> or tfds:<name>[/<config>][:<split>]")


def check_optimizer(config: Any, section: str) -> None:
  number_in(config, f"{section}.learning_rate", 0.0, float("inf"), low_open=True, high_open=True)
  non_negative_int(config, f"{section}.warmup_steps")
  one_of(config, f"{section}.schedule", SCHEDULES)
  number_in(config, f"{section}.end_lr_fraction", 0.0, 1.0)
  number_in(config, f"{section}.b1", 0.0, 1.0, high_open=True)
  number_in(config, f"{section}.b2", 0.0, 1.0, high_open=True)
  number_in(config, f"{section}.eps", 0.0, float("inf"), low_open=True, high_open=True)
  number_in(config, f"{section}.weight_decay", 0.0, float("inf"), high_open=True)
  number_in(config, f"{section}.grad_clip_norm", 0.0, float("inf"), high_open=True)


def check_model(config: Any) -> None:
  """The `model` section builds a valid `ModelConfig` (vocab_size comes from the tokenizer later)."""
  from jaxlm import model as model_lib  # Deferred: the shape checks live with the model.

  fields = dict(config.model)
  fields["attention_impl"] = fields.get("attention_impl") or None
  try:
    model_lib.ModelConfig(**fields)
  except (TypeError, ValueError) as e:
    raise errors.ConfigError("model", str(e)) from None


def check_mesh(config: Any) -> None:
  sizes = {}
  for axis in ("data", "fsdp", "tensor"):
    value = get(config, f"mesh.{axis}")
    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
      _fail(f"mesh.{axis}", value, "a positive integer, or -1 for all devices the other axes leave")
    sizes[axis] = value
  if list(sizes.values()).count(-1) > 1:
    raise errors.ConfigError("mesh", f"at most one axis may be -1, got {sizes}")
  if has(config, "mesh.distributed"):
    one_of(config, "mesh.distributed", ("auto", "yes", "no"))


def check_data(config: Any) -> None:
  check_source("data.source", config.data.source)
  number_in(config, "data.holdout_fraction", 0.0, 1.0, high_open=True)
  positive_int(config, "data.num_threads")
  field_map = config.data.field_map
  for item in (field_map.split(",") if isinstance(field_map, str) and field_map.strip() else []):
    if "=" not in item or not all(part.strip() for part in item.split("=", 1)):
      _fail("data.field_map", field_map, "record_field=feature pairs separated by commas")
  if has(config, "data.invalid"):
    one_of(config, "data.invalid", ("error", "skip"))
  if has(config, "data.max_invalid_fraction"):
    number_in(config, "data.max_invalid_fraction", 0.0, 1.0)


def check_eval(config: Any) -> None:
  for key in ("eval.num_prompts", "eval.batch_size", "eval.max_new_tokens"):
    if has(config, key):
      positive_int(config, key)
  if has(config, "eval.num_samples"):
    non_negative_int(config, "eval.num_samples")
  if has(config, "eval.temperature"):
    number_in(config, "eval.temperature", 0.0, float("inf"), low_open=True, high_open=True)
  if has(config, "eval.prompts") and config.eval.prompts:
    check_source("eval.prompts", config.eval.prompts)


def check_common(config: Any) -> None:
  """Checks every shared key `config` has (see the module docstring); raises `errors.ConfigError`."""
  for key in POSITIVE_INTS:
    if has(config, key):
      positive_int(config, key)
  for key in NON_NEGATIVE_INTS:
    if has(config, key):
      non_negative_int(config, key)
  if has(config, "seed"):
    non_negative_int(config, "seed")
  if has(config, "num_microbatches") and has(config, "batch_size") and config.batch_size % config.num_microbatches:
    raise errors.ConfigError("num_microbatches", f"{config.num_microbatches} must divide "
                             f"config.batch_size={config.batch_size}")
  if has(config, "length_policy"):
    one_of(config, "length_policy", LENGTH_POLICIES)
  for section in OPTIMIZER_SECTIONS:
    if has(config, section):
      check_optimizer(config, section)
  if has(config, "optimizer.warmup_steps") and has(config, "total_steps"):
    positive_int(config, "total_steps")
    if config.optimizer.warmup_steps > config.total_steps:
      raise errors.ConfigError("optimizer.warmup_steps", f"{config.optimizer.warmup_steps} exceeds "
                               f"config.total_steps={config.total_steps}; lower it (e.g. "
                               f"--config.optimizer.warmup_steps={config.total_steps // 10})")
  if has(config, "model"):
    check_model(config)
  if has(config, "seq_len") and has(config, "model.max_len") and config.seq_len > config.model.max_len:
    raise errors.ConfigError("seq_len", f"{config.seq_len} exceeds config.model.max_len={config.model.max_len}")
  if has(config, "mesh"):
    check_mesh(config)
  if has(config, "data"):
    check_data(config)
  if has(config, "eval"):
    check_eval(config)
