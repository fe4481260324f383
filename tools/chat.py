"""Chats with a trained model: an interactive multi-turn session, or one answer for scripts.

  python tools/chat.py --workdir runs/sft                       # interactive
  python tools/chat.py --workdir runs/sft --prompt "What is the capital of France?"
  python tools/chat.py --workdir runs/dpo --system "Be brief." --greedy

Any stage's run directory works; the latest checkpoint is used (a run still training can be
tried too). A pretraining run has never seen the chat format, so its replies show what the
template alone does to it; a reward-model run is not a generator at all (a warning says so).

Interactive mode reads one user message per line from stdin and streams the reply to stdout
as it is generated. Commands: ``/reset`` forgets the conversation (the --system message stays),
``/quit`` (or end of input, Ctrl-D) exits; Ctrl-C abandons the reply being generated. When the
conversation outgrows the model's context, the oldest turns are dropped (the system message
is kept) and a note says so on stderr. Notes, the banner and warnings go to stderr, so stdout
holds only the replies.

With ``--prompt`` it answers that one message, prints only the reply to stdout, and exits 0.

Sampling: temperature, then top-k, then top-p (`jaxlm.sampling`); ``--greedy`` takes the most
likely token. Turn k of a session draws with ``fold_in(key(--seed), k)``, so a session with the
same inputs and flags replays exactly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

try:
  import jaxlm  # noqa: F401
except ImportError:  # Run as `python tools/chat.py` from a checkout that isn't installed.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from jaxlm import chat_template  # noqa: E402
from jaxlm import errors  # noqa: E402
from jaxlm import inference  # noqa: E402
from jaxlm.data.errors import DataError  # noqa: E402
from jaxlm.sampling import SamplingConfig  # noqa: E402


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a stage's run directory")
  parser.add_argument("--prompt", help="answer this one message, print the reply, and exit")
  parser.add_argument("--system", help="a system message that opens the conversation")
  parser.add_argument("--temperature", type=float, default=0.7, help="softmax temperature (> 0)")
  parser.add_argument("--top_k", type=int, default=0, help="keep the k likeliest tokens (0: off)")
  parser.add_argument("--top_p", type=float, default=0.9, help="nucleus mass to keep (1: off)")
  parser.add_argument("--greedy", action="store_true", help="always take the likeliest token")
  parser.add_argument("--max_new_tokens", type=int, default=256,
                      help="longest reply in tokens (capped at half the model's max_len)")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed")
  parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
  args = parser.parse_args(argv)
  try:
    args.sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, greedy=args.greedy)
  except ValueError as e:
    parser.error(str(e))
  return args


def _note(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


def _max_new_tokens(loaded: inference.LoadedModel, requested: int) -> int:
  """`requested`, capped so that a prompt of at least half the context still fits."""
  cap = loaded.model_config.max_len // 2
  if requested > cap:
    _note(f"note: --max_new_tokens {requested} capped at {cap} (half the model's max_len "
          f"{loaded.model_config.max_len}, so the conversation keeps the other half)")
  return min(requested, cap)


def _stream(loaded: inference.LoadedModel, messages: list[dict], args: argparse.Namespace,
            max_new_tokens: int, turn: int) -> dict:
  """Streams the reply to `messages` to stdout and returns its summary (`inference`)."""
  rng = jax.random.fold_in(jax.random.key(args.seed), turn)
  pieces = inference.stream_reply(loaded, messages, sampling=args.sampling,
                                  max_new_tokens=max_new_tokens, rng=rng)
  while True:
    try:
      piece = next(pieces)
    except StopIteration as stop:
      print(flush=True)
      return stop.value
    sys.stdout.write(piece)
    sys.stdout.flush()


def _fit_history(loaded: inference.LoadedModel, messages: list[dict],
                 max_new_tokens: int) -> list[dict]:
  """Drops the oldest turns after the system message until the conversation fits the context.

  The newest message always stays: if even that does not fit, `stream_reply` keeps its end.
  """
  head = messages[:1] if messages and messages[0]["role"] == "system" else []
  body = messages[len(head):]
  dropped = 0
  while len(body) > 1 and not inference.fits(loaded, head + body, max_new_tokens=max_new_tokens):
    body = body[1:]
    dropped += 1
  if dropped:
    _note(f"note: the conversation outgrew the context; dropped its {dropped} oldest messages")
  if not inference.fits(loaded, head + body, max_new_tokens=max_new_tokens):
    total = len(chat_template.render_prompt(loaded.tokenizer, head + body))
    room = inference.prompt_room(loaded, max_new_tokens)
    _note(f"note: this message does not fit the context: the conversation renders to {total} tokens and "
          f"{room} fit (max_len {loaded.model_config.max_len} - {max_new_tokens} for the reply); the model "
          f"sees only its last {room} tokens")
  return head + body


def _repl(loaded: inference.LoadedModel, args: argparse.Namespace, max_new_tokens: int) -> int:
  system = [{"role": "system", "content": args.system}] if args.system else []
  messages = list(system)
  interactive = sys.stdin.isatty()
  _note(f"jaxlm chat: {loaded.stage} run {loaded.workdir}, step {loaded.step}"
        f"{'' if loaded.complete else ' (run not complete)'}. /reset starts over, /quit exits.")
  turn = 0
  while True:
    try:
      line = input("> " if interactive else "")
    except EOFError:
      break
    except UnicodeDecodeError as e:
      _note(f"input is not UTF-8 text ({e.reason}); ignored")
      continue
    except KeyboardInterrupt:
      print(file=sys.stderr)
      break
    text = line.strip()
    if not text:
      continue
    try:
      text.encode("utf-8")
    except UnicodeEncodeError:  # Undecodable bytes arrive as lone surrogates (surrogateescape).
      _note("input is not UTF-8 text; ignored (the conversation is kept)")
      continue
    if text in ("/quit", "/exit"):
      break
    if text == "/reset":
      messages = list(system)
      _note("(conversation reset)")
      continue
    if text.startswith("/") and " " not in text:
      _note(f"unknown command {text!r}: /reset or /quit")
      continue
    attempt = _fit_history(loaded, messages + [{"role": "user", "content": text}],
                           max_new_tokens)
    try:
      info = _stream(loaded, attempt, args, max_new_tokens, turn)
    except KeyboardInterrupt:
      print(flush=True)
      _note("(reply interrupted; not kept)")
      continue
    except DataError as e:  # A message the chat format refuses: say so, keep the conversation.
      _note(f"error: {e}; message ignored (the conversation is kept)")
      continue
    turn += 1
    messages = attempt
    if not info["text"].strip():
      # An empty assistant message breaks the chat schema; the user turn stays unanswered.
      _note("(empty reply)")
      continue
    messages.append({"role": "assistant", "content": info["text"]})
    if not info["ended_turn"]:
      _note(f"(reply cut off at {info['num_tokens']} tokens)")
  return 0


def main(argv: list[str] | None = None) -> int:
  args = _parse_args(argv)
  # Orbax warns about opening a checkpoint directory read-only; that is the intent here.
  logging.getLogger("absl").setLevel(logging.ERROR)
  loaded = inference.load_run(args.workdir)  # A bad run directory is a user error (`errors.guard`).
  if loaded.stage not in inference.POLICY_STAGES:
    _note(f"warning: {loaded.workdir} is a {loaded.stage!r} run, not a policy "
          f"({', '.join(inference.POLICY_STAGES)}); its replies mean nothing")
  max_new_tokens = _max_new_tokens(loaded, args.max_new_tokens)
  if args.prompt is None:
    return _repl(loaded, args, max_new_tokens)
  messages = [{"role": "system", "content": args.system}] if args.system else []
  messages.append({"role": "user", "content": args.prompt})
  _stream(loaded, _fit_history(loaded, messages, max_new_tokens), args, max_new_tokens, turn=0)
  return 0


if __name__ == "__main__":
  try:
    sys.exit(errors.guard(main)())
  except BrokenPipeError:  # `... | head`: stop quietly.
    sys.stderr.close()
    sys.exit(0)
