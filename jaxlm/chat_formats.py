"""Chat formats of imported model families: Llama 3, ChatML (Qwen2/2.5, Qwen3), Mistral.

Each family is written in Python, so the loss mask is exact by construction, and is accepted for
a tokenizer only after it reproduces the model's own Jinja template (`jaxlm.jinja_chat`, the
environment transformers uses) on probe conversations (`choose_format`).

How a conversation becomes ids and a mask (`TextFormat`):

1. The family renders the template's text, recording three kinds of character spans: the
   message contents (user text, never parsed for special tokens), and per assistant message the
   *reply span*: from where the generation prompt ends to the end of the end-of-turn token that
   closes the reply.
2. The tokenizer encodes the text as transformers' ``apply_chat_template(tokenize=True)`` does
   (special-token strings the template wrote become their ids; text between them is encoded
   piecewise, so ids equal transformers'), except that special-token strings inside message
   contents stay text (transformers' ``sanitize_control_tokens=True``): a user typing
   ``<|im_end|>`` cannot close a turn (`jaxlm.hf_tokenizer.HFTokenizer.encode_chat`).
3. The mask is True on every token whose characters overlap a reply span: the reply and its
   end of turn, nothing else. A token that straddles the generation prompt's end (ChatML's
   ``"\\n"`` merged with a reply starting with a newline) counts as the reply's.

Families (``render_prompt(msgs[:k]) + render_response(reply) == render_chat(msgs[:k+1])``,
the prompt/response invariant, is documented per family; jaxlm's own format always has it):

- Llama 3 (``<|start_header_id|>role<|end_header_id|>\\n\\n content|trim <|eot_id|>``): the
  3.0 template, and the 3.1/3.2 one, which always opens with a system turn holding "Cutting
  Knowledge Date: December 2023" and "Today Date: <date_string>" before the system message.
  The date is a template variable; 3.2 fills it with today's date, so jaxlm pins it
  (`DEFAULT_DATE_STRING`, or ``date_string=`` when loading) to keep training data reproducible.
  Contents are trimmed; `render_response` trims too. Invariant: holds (for trimmed replies).
- ChatML (``<|im_start|>role\\n content <|im_end|>\\n``): Qwen2/2.5 add a default system prompt
  when the chat has none (Qwen2.5: "You are Qwen, created by Alibaba Cloud. ..."), read from
  the template itself. Invariant: the chat has one more token, the ``"\\n"`` after the last
  ``<|im_end|>``, so prompt + response is a prefix of the chat ids.
- Qwen3 (ChatML with thinking): assistant turns after the last user message are written with
  a ``<think>...</think>`` block (empty when there was no reasoning); earlier ones lose theirs.
  The block is part of the trained reply. Invariant: holds for the last turn only (earlier
  assistant turns are rewritten without thinking), plus ChatML's trailing ``"\\n"``.
  `parse_reply` drops the thinking block from the text.
- Mistral (``[INST] user [/INST] reply</s>``): v0.1/v0.2/v0.3 templates differ in spaces,
  trimming and where the system message goes (none, the first user turn, the *last* user
  turn); the variant is found by probing. Roles must alternate user/assistant. There is no
  generation prompt: the prompt ends with ``[/INST]``. Invariant: holds without a system
  message; with one, a v0.3 template puts it only into the last user turn, so it is in the
  prompt but not in a chat that ends with a reply.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from jaxlm import jinja_chat
from jaxlm.chat_template import Reply, parse_at_stops
from jaxlm.data.errors import DataError

DEFAULT_DATE_STRING = "26 Jul 2024"  # Llama 3.1's own default; 3.2 would use today's date.


class UnsupportedChat(ValueError):
  """A conversation the family's template refuses (e.g. Mistral's roles must alternate)."""


@dataclasses.dataclass
class Rendered:
  """A family's text for a conversation, with the spans that decide ids and mask.

  Attributes:
    text: exactly the template's output.
    contents: [start, end) character spans of message text (special strings there stay text).
    replies: [start, end) spans of each assistant reply, its end-of-turn token included.
  """

  text: str = ""
  contents: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  replies: list[tuple[int, int]] = dataclasses.field(default_factory=list)

  def add(self, text: str, *, content: bool = False) -> int:
    """Appends `text` (recorded as content if asked); returns where it starts."""
    start = len(self.text)
    self.text += text
    if content and text:
      self.contents.append((start, len(self.text)))
    return start


class TextFormat:
  """A family rendered to text in Python, tokenized by its HF tokenizer (module docstring).

  Subclasses implement `render_text` and set `name`, `end_of_turn` (the token string closing a
  reply) and `prompt_response_invariant`; `options` holds what a template variant decided.
  """

  name = "text"
  end_of_turn = ""
  prompt_response_invariant = False
  extra_stops: tuple[str, ...] = ()  # further stop token strings, where the vocabulary has them

  def __init__(self, tokenizer, *, special_tokens: dict[str, str | None],
               stop_ids: Iterable[int] = (), **options: Any):
    self._tokenizer = tokenizer
    self.special_tokens = dict(special_tokens)
    self.options = options
    self.end_of_turn_id = self._token_id(self.end_of_turn)
    stops = [self.end_of_turn_id]
    for token in self.extra_stops:
      if tokenizer.token_to_id(token) is not None:
        stops.append(tokenizer.token_to_id(token))
    stops += [tokenizer.eos_id, *stop_ids]
    self.stop_ids = tuple(dict.fromkeys(int(i) for i in stops))  # unique, end of turn first

  def _token_id(self, token: str) -> int:
    i = self._tokenizer.token_to_id(token)
    if i is None:
      raise ValueError(f"{self.name} chat format: the vocabulary has no {token!r} token")
    return i

  @property
  def template_variables(self) -> dict[str, Any]:
    """Variables the template needs to render what `render_text` renders (e.g. date_string)."""
    return {}

  def render_text(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> Rendered:
    raise NotImplementedError

  def _render(self, messages, add_generation_prompt: bool, where: str) -> Rendered:
    try:
      return self.render_text(messages, add_generation_prompt)
    except UnsupportedChat as e:
      raise DataError(where, f"field 'messages': {e} (the {self.name} chat template)") from None

  def _encode(self, rendered: Rendered) -> tuple[np.ndarray, np.ndarray]:
    ids, starts, ends = self._tokenizer.encode_chat(rendered.text, rendered.contents)
    mask = np.zeros(len(ids), np.bool_)
    for start, end in rendered.replies:
      # Overlap with [start, end); a zero-width token counts where it sits.
      mask |= (starts < end) & (np.maximum(ends, starts + 1) > start)
    return np.asarray(ids, np.int32), mask

  def render_chat(self, messages, *, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    return self._encode(self._render(messages, False, where))

  def render_prompt(self, messages, *, where: str = "") -> np.ndarray:
    return self._encode(self._render(messages, True, where))[0]

  def render_response(self, text: str) -> np.ndarray:
    """The reply's ids as the last turn of a one-question chat: what follows `render_prompt`."""
    chat = [{"role": "user", "content": "?"}, {"role": "assistant", "content": text}]
    ids, mask = self._encode(self.render_text(chat, False))
    return ids[mask]

  def reply_text(self, text: str) -> str:
    """The visible reply in decoded text (a family may drop template-added parts)."""
    return text

  def parse_reply(self, ids) -> Reply:
    reply = parse_at_stops(self._tokenizer, ids, self.stop_ids, self.end_of_turn_id)
    return reply._replace(text=self.reply_text(reply.text))

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.options})"


# --- Llama 3 ----------------------------------------------------------------------------------


class Llama3Format(TextFormat):
  """Llama 3 / 3.1 / 3.2 (module docstring). Options: dated (the 3.1/3.2 system preamble),
  date_string."""

  name = "llama3"
  end_of_turn = "<|eot_id|>"
  extra_stops = ("<|end_of_text|>", "<|eom_id|>")
  prompt_response_invariant = True

  @property
  def template_variables(self):
    return {"date_string": self.options["date_string"]} if self.options["dated"] else {}

  def _turn(self, out: Rendered, role: str, content: str, trained: bool) -> None:
    out.add(f"<|start_header_id|>{role}<|end_header_id|>\n\n")
    start = out.add(content.strip(), content=True)
    out.add(self.end_of_turn)
    if trained:
      out.replies.append((start, len(out.text)))

  def render_text(self, messages, add_generation_prompt):
    out, bos = Rendered(), self.special_tokens.get("bos_token") or ""
    if self.options["dated"]:
      system = messages[0]["content"].strip() if messages and messages[0]["role"] == "system" else ""
      rest = messages[1:] if messages and messages[0]["role"] == "system" else messages
      out.add(bos + "<|start_header_id|>system<|end_header_id|>\n\n"
              "Cutting Knowledge Date: December 2023\n"
              f"Today Date: {self.options['date_string']}\n\n")
      out.add(system, content=True)
      out.add(self.end_of_turn)
    else:
      rest = messages
      if messages:
        out.add(bos)
    for message in rest:
      self._turn(out, message["role"], message["content"], message["role"] == "assistant")
    if add_generation_prompt:
      out.add("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return out


# --- ChatML: Qwen2 / Qwen2.5, Qwen3 -----------------------------------------------------------


class ChatMLFormat(TextFormat):
  """ChatML (module docstring). Options: default_system (None or the text added when a chat has
  no system message), system_on_empty (whether an empty chat gets it too)."""

  name = "chatml"
  end_of_turn = "<|im_end|>"
  extra_stops = ("<|endoftext|>",)

  def _open(self, out: Rendered, messages) -> None:
    default = self.options["default_system"]
    if default is not None and (messages[0]["role"] != "system" if messages
                                else self.options["system_on_empty"]):
      out.add(f"<|im_start|>system\n{default}<|im_end|>\n")

  def _reply(self, out: Rendered, message) -> None:
    out.add("<|im_start|>assistant\n")
    start = out.add(message["content"], content=True)
    out.add(self.end_of_turn)
    out.replies.append((start, len(out.text)))
    out.add("\n")

  def render_text(self, messages, add_generation_prompt):
    out = Rendered()
    self._open(out, messages)
    for message in messages:
      if message["role"] == "assistant":
        self._reply(out, message)
      else:
        out.add(f"<|im_start|>{message['role']}\n")
        out.add(message["content"], content=True)
        out.add("<|im_end|>\n")
    if add_generation_prompt:
      out.add("<|im_start|>assistant\n")
    return out


class Qwen3Format(ChatMLFormat):
  """Qwen3's ChatML with thinking blocks (module docstring); no default system prompt."""

  name = "qwen3"
  # What the template writes before a reply's text: "<think>\n...\n</think>\n\n".
  _THINK = re.compile(r"^<think>.*?</think>\n{0,2}", re.DOTALL)

  def render_text(self, messages, add_generation_prompt):
    # Replies after the last user message keep a thinking block (the template's last_query_index).
    last_query = max((i for i, m in enumerate(messages) if m["role"] == "user"),
                     default=len(messages) - 1)
    out = Rendered()
    for i, message in enumerate(messages):
      if message["role"] == "assistant":
        self._assistant(out, message["content"], after_query=i > last_query,
                        last=i == len(messages) - 1)
      else:
        out.add(f"<|im_start|>{message['role']}\n")
        out.add(message["content"], content=True)
        out.add("<|im_end|>\n")
    if add_generation_prompt:
      out.add("<|im_start|>assistant\n")
      if self.options.get("enable_thinking") is False:
        out.add("<think>\n\n</think>\n\n")
    return out

  def _assistant(self, out: Rendered, content: str, *, after_query: bool, last: bool) -> None:
    out.add("<|im_start|>assistant\n")
    start = len(out.text)
    reasoning = ""
    if "</think>" in content:  # The template splits a reply's own thinking off, so we do too.
      reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
      content = content.split("</think>")[-1].lstrip("\n")
    if after_query and (last or reasoning):
      out.add("<think>\n")
      out.add(reasoning.strip("\n"), content=True)
      out.add("\n</think>\n\n")
      content = content.lstrip("\n")
    out.add(content, content=True)
    out.add(self.end_of_turn)
    out.replies.append((start, len(out.text)))
    out.add("\n")

  @property
  def template_variables(self):
    value = self.options.get("enable_thinking")
    return {} if value is None else {"enable_thinking": value}

  def reply_text(self, text: str) -> str:
    return self._THINK.sub("", text, count=1)


# --- Mistral ----------------------------------------------------------------------------------


class MistralFormat(TextFormat):
  """Mistral (module docstring). Options: inst_open ("[INST] " or " [INST] "), inst_close
  (" [/INST]" or "[/INST]"), reply_prefix ("" or " "), trim (strip replies), system ("none":
  refused, "first" or "last": folded into that user turn)."""

  name = "mistral"
  end_of_turn = "</s>"

  def __init__(self, tokenizer, **kwargs):
    # A reply ends with the tokenizer's eos, whatever its spelling.
    self.end_of_turn = kwargs["special_tokens"].get("eos_token") or "</s>"
    super().__init__(tokenizer, **kwargs)

  def render_text(self, messages, add_generation_prompt):
    o = self.options
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    if system is not None and o["system"] == "none":
      raise UnsupportedChat("a system message is not supported")
    for i, message in enumerate(rest):
      if (message["role"] == "user") != (i % 2 == 0):
        raise UnsupportedChat("after the optional system message, roles must alternate "
                              "user/assistant/user/assistant/...")
    out = Rendered()
    out.add(self.special_tokens.get("bos_token") or "")
    for i, message in enumerate(rest):
      if message["role"] == "user":
        out.add(o["inst_open"])
        fold = system is not None and (i == 0 if o["system"] == "first" else i == len(rest) - 1)
        if fold:
          out.add(system, content=True)
          out.add("\n\n")
        out.add(message["content"], content=True)
        out.add(o["inst_close"])
      else:
        start = out.add(o["reply_prefix"])
        out.add(message["content"].strip() if o["trim"] else message["content"], content=True)
        out.add(self.end_of_turn)
        out.replies.append((start, len(out.text)))
    return out


def _mistral_variants() -> list[dict[str, Any]]:
  keys = ("inst_open", "inst_close", "reply_prefix", "trim", "system")
  values = (("[INST] ", " [INST] "), (" [/INST]", "[/INST]"), ("", " "), (False, True),
            ("none", "first", "last"))
  return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


# --- Choosing and verifying a tokenizer's format ----------------------------------------------

# Probe conversations: roles, system or not, whitespace a template may trim, several turns.
_PROBES = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": " Sys\n"}, {"role": "user", "content": " one "},
     {"role": "assistant", "content": "\nTwo.\n"}, {"role": "user", "content": "three"},
     {"role": "assistant", "content": "Four"}],
    [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": " c "},
     {"role": "user", "content": "d"}],
    [],
]


def _families(template: str) -> list[tuple[type, list[dict[str, Any]]]]:
  """Candidate (format class, option sets) for a template, from its markers."""
  if "<|start_header_id|>" in template and "<|eot_id|>" in template:
    return [(Llama3Format, [{"dated": False}, {"dated": True}])]
  if "<|im_start|>" in template and "<|im_end|>" in template:
    if "<think>" in template:
      return [(Qwen3Format, [{}])]
    return [(ChatMLFormat, [{"system_on_empty": s} for s in (True, False)])]
  if "[INST]" in template and "[/INST]" in template:
    return [(MistralFormat, _mistral_variants())]
  return []


def _default_system(render: Callable[..., str]) -> str | None:
  """The system turn a ChatML template adds to a chat without one (None: it adds none)."""
  try:
    text = render([{"role": "user", "content": "Hi there"}], False)
  except jinja_chat.TemplateError:
    return None
  match = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n<\|im_start\|>user\n", text, re.DOTALL)
  return match.group(1) if match else None


def choose_format(tokenizer, template: str, *, source: str, special_tokens: dict[str, str | None],
                  stop_ids: Iterable[int] = (), date_string: str | None = None,
                  enable_thinking: bool | None = None) -> TextFormat:
  """The family format that reproduces `template` on every probe conversation.

  Args:
    tokenizer: the `HFTokenizer` the format will tokenize with.
    template: the Jinja chat template text.
    source: the file it came from, named in errors.
    special_tokens: ``{"bos_token": ..., "eos_token": ..., ...}`` as the template sees them.
    stop_ids: more ids that end generation (e.g. generation_config.json's eos ids).
    date_string: Llama 3.1/3.2's date (default `DEFAULT_DATE_STRING`).
    enable_thinking: Qwen3's switch (None: the template's default, thinking on).

  Raises:
    ValueError: naming `source`, when no known family's markers are in the template, or no
      variant of the family renders every probe exactly as the template does (the message
      shows the first difference).
  """
  date_string = DEFAULT_DATE_STRING if date_string is None else date_string
  families = _families(template)
  if not families:
    raise ValueError(
        f"{source}: unknown chat template: jaxlm knows Llama 3 (<|start_header_id|>), ChatML "
        "(<|im_start|>, incl. Qwen3) and Mistral ([INST]) templates, and this one has none of "
        "their markers; train with jaxlm's own format or add the family to jaxlm.chat_formats")

  def render(messages, add_generation_prompt, **variables):
    return jinja_chat.render(template, messages, add_generation_prompt=add_generation_prompt,
                             special_tokens=special_tokens, **variables)

  first_difference = None
  for cls, variants in families:
    for options in variants:
      options = dict(options)
      if cls is Llama3Format:
        options["date_string"] = date_string
      if cls is ChatMLFormat:
        options["default_system"] = _default_system(render)
      if cls is Qwen3Format:
        options["enable_thinking"] = enable_thinking
      fmt = cls(tokenizer, special_tokens=special_tokens, stop_ids=stop_ids, **options)
      difference = _first_difference(fmt, render)
      if difference is None:
        return fmt
      first_difference = first_difference or difference
  raise ValueError(
      f"{source}: the chat template looks like {families[0][0].name} but jaxlm's {families[0][0].name} "
      f"format does not reproduce it, so it is refused rather than guessed: {first_difference}")


def _first_difference(fmt: TextFormat, render) -> str | None:
  """None if `fmt` renders every probe as the template does, else what differs first."""
  compared = 0
  for messages in _PROBES:
    for add_generation_prompt in (False, True):
      try:
        ours = fmt.render_text(messages, add_generation_prompt).text
      except UnsupportedChat:
        ours = None
      try:
        theirs = render(messages, add_generation_prompt, **fmt.template_variables)
      except jinja_chat.TemplateError:
        theirs = None
      if ours is None or theirs is None:
        # Many templates index messages[0], so an empty chat may be refused by either side;
        # otherwise both must refuse the same chats.
        if ours is None and theirs is not None:
          return f"the template renders {messages!r}, which this variant refuses"
        if ours is not None and messages:
          return f"the template refuses {messages!r}, which jaxlm would render"
        continue
      compared += 1
      if ours != theirs:
        return (f"for {messages!r} (add_generation_prompt={add_generation_prompt}) the template "
                f"gives {theirs!r}, jaxlm {ours!r}")
  return None if compared >= 4 else "too few probe conversations rendered to verify it"
