"""Preference pairs given as two whole conversations: `{"chosen": full_text, "rejected": full_text}`.

Many public preference sets (Anthropic HH-RLHF and its derivatives) store each side as the whole
transcript, the prompt repeated in both:

  chosen   = "\\n\\nHuman: Hi, what is 2 + 2?\\n\\nAssistant: 4."
  rejected = "\\n\\nHuman: Hi, what is 2 + 2?\\n\\nAssistant: Paris."

`split_shared_prefix` recovers the canonical preference record: the shared prefix is the
prompt, the rest of each side its response. The prefix is cut back to the start of the last
assistant turn when the transcript has role markers (so a response that happens to begin with
the same words as the other keeps them), else to the last whitespace (never mid-word). The
prompt text becomes messages: `Human:`/`User:` and `Assistant:` markers split it into turns;
without markers it is a single user message.
"""

from __future__ import annotations

import re

from jaxlm.data.errors import DataError

# "Human:" / "User:" / "Assistant:" at the start of the text or of a line.
_MARKER = re.compile(r"(?:^|\n)\s*(Human|User|Assistant)\s*:", re.IGNORECASE)
_ROLES = {"human": "user", "user": "user", "assistant": "assistant"}


def _common_prefix_length(a: str, b: str) -> int:
  n = min(len(a), len(b))
  i = 0
  while i < n and a[i] == b[i]:
    i += 1
  return i


def _messages(prompt_text: str, where: str) -> list[dict[str, str]]:
  """Prompt text -> chat messages (split at role markers, else one user message)."""
  markers = list(_MARKER.finditer(prompt_text))
  if not markers:
    text = prompt_text.strip()
    if not text:
      raise DataError(where, "fields 'chosen'/'rejected': the two texts share no prompt (no common prefix)")
    return [{"role": "user", "content": text}]
  messages = []
  before = prompt_text[:markers[0].start()].strip()
  if before:  # Text ahead of the first marker is the user's (e.g. "Q: ...\n\nAssistant:").
    messages.append({"role": "user", "content": before})
  for marker, following in zip(markers, markers[1:] + [None]):
    end = following.start() if following is not None else len(prompt_text)
    content = prompt_text[marker.end():end].strip()
    if content:
      messages.append({"role": _ROLES[marker.group(1).lower()], "content": content})
  if not messages or messages[-1]["role"] != "user":
    raise DataError(where, "fields 'chosen'/'rejected': the shared prompt must end with a user turn "
                    "followed by the assistant's marker")
  return messages


def split_shared_prefix(chosen: str, rejected: str, where: str) -> tuple[list[dict[str, str]], str, str]:
  """(prompt messages, chosen response, rejected response) of two whole transcripts.

  Args:
    chosen, rejected: the two sides, each prompt + response as one text.
    where: the record's place for errors (``file:line``).

  Raises:
    DataError: the texts are identical, share no prompt, or a response is empty after the split.
  """
  if chosen == rejected:
    raise DataError(where, "fields 'chosen' and 'rejected' are identical: nothing to prefer")
  cut = _common_prefix_length(chosen, rejected)
  assistant_turns = [m for m in _MARKER.finditer(chosen[:cut]) if m.group(1).lower() == "assistant"]
  if assistant_turns:
    cut = assistant_turns[-1].end()  # Responses start right after the last shared "Assistant:".
  else:
    while cut > 0 and not chosen[cut - 1].isspace():
      cut -= 1  # Back to a word boundary: never split a word between prompt and response.
  prompt, chosen_reply, rejected_reply = chosen[:cut], chosen[cut:].strip(), rejected[cut:].strip()
  if not chosen_reply or not rejected_reply:
    raise DataError(where, "fields 'chosen'/'rejected': one side is a prefix of the other, so its "
                    "response would be empty")
  return _messages(prompt, where), chosen_reply, rejected_reply
