"""Talking to a trained model: load any stage's run directory, stream a reply, answer in batches.

Two ways to generate, with the same model, chat template and sampling rule:

- `stream_reply`: one conversation, one token at a time, yielding text as it is decoded (for
  `tools/chat.py`). The prompt is prefilled into the KV cache by one jitted call, then a jitted
  single-step function samples a token and feeds it back; the loop is in Python so every token
  can be shown as soon as it exists.
- `batch_replies`: many prompts at once through `jaxlm.policy_eval.generate_replies` (the
  batched sampler every evaluation uses), for `tools/sample.py`.

Both render the prompt with `chat_template.render_prompt` (the conversation so far, then
what opens an assistant turn: jaxlm's ``<|assistant|>``), stop at the tokenizer's chat format's
`stop_ids` (jaxlm: ``<|end|>`` or ``</s>``; Llama 3: ``<|eot_id|>``, ``<|end_of_text|>``), choose tokens with
`sampling.sample_logits`, and derive the key of step t of row b as
``fold_in(fold_in(rng, b), t)`` (the rule `jaxlm.sampling` documents). So at the same settings
a streamed reply is the reply `generate` gives row 0 of a batch with the same key; greedy
replies agree with any batch row.

Each reply is described by the same four numbers wherever it comes from:

  text        the reply, decoded up to (not including) the stop token
  ended_turn  whether the model closed its turn with the format's end of turn (``<|end|>``);
              False: it stopped on another stop id (``</s>``, which the chat template never
              trains) or was cut off at `max_new_tokens`
  num_tokens  tokens generated, the stop token included
  log_prob    the sum of the generated tokens' log-probs (the stop token included) under the
              distribution each was drawn from (see `jaxlm.sampling`: after temperature and
              truncation; the plain model log-prob when greedy)

Shapes are padded so that a session compiles a handful of programs, not one per turn: prompt
widths are rounded up to a multiple of `PROMPT_BUCKET`, the stream's cache always has the
model's `max_len` slots, and a batch is padded to `batch_size` rows (or the next power of two
for fewer prompts).

Prompts longer than the context allows (``max_len - max_new_tokens`` tokens) keep their last
tokens behind the ``<s>`` (if the tokenizer has one; `policy_eval.left_truncate`): the newest turns and the
``<|assistant|>`` marker survive, the oldest text (a system message included) is cut. `tools/chat.py` avoids that by dropping whole old
turns first (`fits`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import chat_template
from jaxlm import checkpoint
from jaxlm import errors
from jaxlm import model as model_lib
from jaxlm import policy_eval
from jaxlm import sampling as sampling_lib
from jaxlm import tokenizer as tokenizer_lib

PROMPT_BUCKET = 64  # prompt widths are rounded up to a multiple of this (one compile per bucket)
POLICY_STAGES = ("pretrain", "sft", "ppo", "dpo", "grpo", "import")


# --- Loading a run ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A run directory's model, ready to generate.

  Attributes:
    params: plain (unboxed) params on the default device (so the model must fit one
      accelerator); the language-model tree (see `load_run` for reward and PPO runs).
    model_config: the `ModelConfig` the run recorded in its manifest.
    tokenizer: the run's tokenizer.
    manifest: the run's manifest.json.
    config: the run's config.json.
    stage: the manifest's stage name ("pretrain", "sft", "reward", ...).
    workdir: the run directory (absolute).
    step: the step of the checkpoint the params come from (the latest one).
  """

  params: Any
  model_config: model_lib.ModelConfig
  tokenizer: tokenizer_lib.TokenizerLike
  manifest: dict
  config: dict
  stage: str
  workdir: str
  step: int

  @property
  def complete(self) -> bool:
    """Whether the run had finished (False: the params are an intermediate checkpoint)."""
    return bool(self.manifest.get("complete"))


def _check_run_dir(run: checkpoint.RunDir) -> None:
  """Raises FileNotFoundError with what is missing, before orbax gets a chance to be cryptic."""
  if not os.path.isdir(run.workdir):
    raise errors.MissingError(f"run directory not found: {run.workdir}")
  if not os.path.isfile(run.manifest_path):
    raise errors.MissingError(
        f"{run.workdir} is not a jaxlm run directory: {run.manifest_path} is missing (expected "
        "the --workdir of a stage, e.g. python -m experiments.pretrain --workdir=DIR)")
  # Orbax names a finished step directory by its step number (a save in progress has a
  # temporary name), so an all-digit entry means a checkpoint exists.
  steps = ([name for name in os.listdir(run.checkpoint_dir) if name.isdigit()]
           if os.path.isdir(run.checkpoint_dir) else [])
  if not steps:
    raise errors.MissingError(
        f"{run.workdir} has no checkpoint yet (expected {run.checkpoint_dir}/<step>/): the run "
        "has not reached its first checkpoint")


def _language_model_params(params: Mapping[str, Any], where: str) -> Mapping[str, Any]:
  """The transformer tree inside a stage's saved params.

  Every stage so far saves the transformer tree itself; a stage that saves several models
  (e.g. PPO's policy and value) is expected to keep the policy under "policy".
  """
  if "embed" not in params and "policy" in params:
    params = params["policy"]
  if "embed" not in params or "final_norm" not in params:
    raise errors.RunDirError(f"{where}: the saved params are not a jaxlm transformer (top-level keys "
                     f"{sorted(params)}; expected 'embed', 'final_norm', 'layers', ...)")
  return params


def load_run(workdir: str | os.PathLike) -> LoadedModel:
  """Loads the latest checkpoint of any stage's run directory, for generation.

  Only the params are read (`checkpoint.load_parent`), from the latest checkpoint, so a run
  still training (or interrupted) can be sampled from too; `LoadedModel.complete` says which.

  A reward-model run loads as well: its tree is the transformer plus a scalar head, and its
  language-model head is the (tied) token embedding it was initialised with and never trained
  for generation after that. Chatting with it is allowed but meaningless (the tools warn);
  use `stage` to refuse it where that matters.

  Args:
    workdir: a stage's run directory (the `--workdir` it was run with).

  Returns:
    A `LoadedModel` with the params on the default device.

  Raises:
    FileNotFoundError: the directory, its manifest.json, its tokenizer or any checkpoint is
      missing (the message names the path and what was expected).
    ValueError: a manifest without a model_config, a tokenizer that does not match the
      manifest, or saved params that are not a transformer.
  """
  run = checkpoint.RunDir(workdir)
  _check_run_dir(run)
  parent = checkpoint.load_parent(run.workdir, require_complete=False)
  where = os.path.join(run.checkpoint_dir, str(parent.step))
  params = jax.device_put(_language_model_params(parent.params, where))
  return LoadedModel(params=params, model_config=parent.model_config, tokenizer=parent.tokenizer,
                     manifest=parent.manifest, config=parent.config,
                     stage=str(parent.manifest.get("stage")), workdir=run.workdir,
                     step=int(parent.step))


# --- Prompts ---------------------------------------------------------------------------------


def _bucket(n: int) -> int:
  return max(PROMPT_BUCKET, -(-n // PROMPT_BUCKET) * PROMPT_BUCKET)


def prompt_room(loaded: LoadedModel, max_new_tokens: int) -> int:
  """How many prompt tokens fit before `max_new_tokens` new ones: max_len - max_new_tokens."""
  room = loaded.model_config.max_len - max_new_tokens
  if max_new_tokens < 1 or room < 1:
    raise ValueError(f"max_new_tokens must be in [1, {loaded.model_config.max_len - 1}] (the "
                     f"model's max_len is {loaded.model_config.max_len}), got {max_new_tokens}")
  return room


def prompt_ids(loaded: LoadedModel, messages: Sequence[Mapping[str, Any]], *,
               max_new_tokens: int, where: str = "") -> np.ndarray:
  """The rendered prompt int32 [T], T <= max_len - max_new_tokens (left-truncated to fit)."""
  ids = chat_template.render_prompt(loaded.tokenizer, messages, where=where)
  return policy_eval.left_truncate(ids, prompt_room(loaded, max_new_tokens),
                                   bos_id=loaded.tokenizer.bos_id)


def fits(loaded: LoadedModel, messages: Sequence[Mapping[str, Any]], *,
         max_new_tokens: int) -> bool:
  """Whether the rendered conversation fits the context without truncation."""
  ids = chat_template.render_prompt(loaded.tokenizer, messages)
  return len(ids) <= prompt_room(loaded, max_new_tokens)


def _row_key(rng: Any, row: int) -> jax.Array:
  """Row `row`'s key under `jaxlm.sampling`'s rule; `rng` is a key, raw key data or an int."""
  if rng is None:
    rng = 0
  if isinstance(rng, (int, np.integer)):
    rng = jax.random.key(int(rng))
  elif not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  return jax.random.fold_in(rng, row)


# --- Streaming one conversation --------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config",))
def _prefill(params, tokens: jax.Array, length: jax.Array, *, config: model_lib.ModelConfig):
  """Writes a right-padded prompt tokens [1, W] (length [1]) into a fresh max_len cache.

  Returns (cache, logits float32 [1, V] after the last real token).
  """
  index = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
  # Padding gets segment id 0, so it is never written to the cache.
  segment_ids = (index < length[:, None]).astype(jnp.int32)
  cache = model_lib.init_cache(config, 1, config.max_len)
  out = model_lib.Transformer(config).apply({"params": params}, tokens, segment_ids=segment_ids,
                                            positions=index, cache=cache)
  last = jnp.take_along_axis(out.logits, (length - 1)[:, None, None], axis=1)[:, 0]
  return out.cache, last


# The cache is donated: each step updates it in place instead of copying [L, 1, S, Hkv, Dh] twice.
@functools.partial(jax.jit, static_argnames=("config", "sampling"), donate_argnames=("cache",))
def _decode_step(params, cache, logits: jax.Array, position: jax.Array, row_key: jax.Array,
                 step: jax.Array, *, config: model_lib.ModelConfig,
                 sampling: sampling_lib.SamplingConfig):
  """Samples token `step` from logits [1, V], writes it at `position` [1], returns the next logits.

  Returns (token int32 [1], log_prob float32 [1], cache, next logits float32 [1, V]).
  """
  keys = jax.random.fold_in(row_key, step)[None]
  token, log_prob = sampling_lib.sample_logits(logits, keys, sampling)
  out = model_lib.Transformer(config).apply({"params": params}, token[:, None],
                                            positions=position[:, None], cache=cache)
  return token, log_prob, out.cache, out.logits[:, 0]


def _settled(text: str) -> str:
  """`text` without trailing U+FFFD: an unfinished UTF-8 sequence (byte-fallback pieces) decodes
  as replacement characters until its last byte arrives, so it is not shown yet."""
  return text.rstrip("\ufffd")


def stream_reply(loaded: LoadedModel, messages: Sequence[Mapping[str, Any]], *,
                 sampling: sampling_lib.SamplingConfig, max_new_tokens: int,
                 rng: Any = None) -> Iterator[str]:
  """Generates the assistant's next turn, yielding its text as tokens are decoded.

  Each step decodes the whole reply so far and yields what was added since the last yield, so
  pieces that only make sense together (byte-fallback bytes of one character, the space that
  SentencePiece attaches to a word) come out right; the concatenation of the yields is the
  reply's text (what `chat_template.parse_reply` gives).

  Args:
    loaded: from `load_run`.
    messages: the conversation so far (`jaxlm.data.schemas` messages, usually ending with a
      user message); may be empty.
    sampling: the `SamplingConfig`.
    max_new_tokens: N, at most this many tokens (the stop token included); 1 <= N < max_len.
    rng: a PRNG key (typed or raw) or an int seed; the draws are those of row 0 of
      `sampling.generate` with this key. None: key 0 (fine for greedy).

  Yields:
    non-empty str pieces of the reply, in order.

  Returns:
    (the generator's return value, e.g. via ``info = yield from stream_reply(...)``) a dict with
    text, ended_turn, num_tokens, log_prob (see the module docstring).

  Raises:
    DataError: the messages break the schema. ValueError: a bad max_new_tokens.
  """
  config, tokenizer = loaded.model_config, loaded.tokenizer
  chat_format = tokenizer.chat_format
  ids = prompt_ids(loaded, messages, max_new_tokens=max_new_tokens)
  tokens = np.zeros((1, min(_bucket(len(ids)), config.max_len)), np.int32)
  tokens[0, :len(ids)] = ids
  cache, logits = _prefill(loaded.params, tokens, np.asarray([len(ids)], np.int32), config=config)
  row_key = _row_key(rng, 0)
  reply: list[int] = []
  shown, log_prob, ended, stopped = "", 0.0, False, False
  for step in range(max_new_tokens):
    token, token_log_prob, cache, logits = _decode_step(
        loaded.params, cache, logits, np.asarray([len(ids) + step], np.int32), row_key,
        np.int32(step), config=config, sampling=sampling)
    token, log_prob = int(token[0]), log_prob + float(token_log_prob[0])
    if token in chat_format.stop_ids:
      # Like every evaluation (`policy_eval.reply_from_ids`): only the end of turn ends it well.
      ended = token == chat_format.end_of_turn_id
      stopped = True
      break
    reply.append(token)
    text = _settled(tokenizer.decode(reply))
    # Decoding is prefix-stable once bytes are complete; if it ever is not (a Hugging Face
    # decoder that strips a leading space, say), hold
    # the text back rather than yield something that contradicts what was shown.
    if len(text) > len(shown) and text.startswith(shown):
      yield text[len(shown):]
      shown = text
  text = tokenizer.decode(reply)
  if len(text) > len(shown) and text.startswith(shown):
    yield text[len(shown):]
  return {"text": text, "ended_turn": ended, "num_tokens": len(reply) + stopped,
          "log_prob": log_prob}


# --- Many prompts at once --------------------------------------------------------------------


def _batch_rows(num_prompts: int, batch_size: int) -> int:
  """Rows per `generate` call: batch_size, or fewer prompts' next power of two (fewer shapes
  than one per count, far less padding than always batch_size)."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  return min(batch_size, 1 << max(num_prompts - 1, 0).bit_length())


def batch_replies(loaded: LoadedModel, prompts: Sequence[Sequence[Mapping[str, Any]]], *,
                  sampling: sampling_lib.SamplingConfig, max_new_tokens: int, seed: int = 0,
                  batch_size: int = 64) -> list[dict[str, Any]]:
  """One reply per prompt (a conversation so far): `policy_eval.generate_replies`, the same
  batched path every evaluation uses, so a reply here is what an eval would have sampled.

  Row i draws with the sampler's row key ``i % rows`` under ``fold_in(key(seed), i // rows)``
  (rows = `batch_size`, or fewer prompts' next power of two), so results depend on (seed,
  batch_size, position) and are reproducible.

  Returns:
    One dict per prompt, in order: text, ended_turn, num_tokens, log_prob (module docstring).

  Raises:
    DataError: naming ``prompt i``, when a prompt breaks the schema.
  """
  replies = policy_eval.generate_replies(
      loaded.params, loaded.model_config, loaded.tokenizer, [{"prompt": list(p)} for p in prompts],
      max_new_tokens=max_new_tokens, rng=jax.random.key(seed), sampling=sampling,
      batch_size=_batch_rows(len(prompts), batch_size))
  return [{"text": text, "ended_turn": bool(ended), "num_tokens": int(n), "log_prob": float(lp)}
          for text, ended, n, lp in zip(replies.texts, replies.ended_turn, replies.lengths, replies.log_probs)]
