"""Running a Hugging Face chat template (Jinja) the way `transformers` runs it.

jaxlm never trains on a model's template output directly (see `jaxlm.chat_formats`: each family
is rendered in Python, with exact loss masks); it runs the template only to *check* that the
Python rendering is the template's, on probe conversations, when a tokenizer is loaded.

The environment copies `transformers.utils.chat_template_utils._compile_jinja_template`
(transformers 5): a sandbox that cannot mutate its inputs (`ImmutableSandboxedEnvironment`),
``trim_blocks`` and ``lstrip_blocks`` (a block tag's own line break and indentation vanish, which
changes the output of every multi-line template), the ``loopcontrols`` extension, a ``tojson``
filter that does not escape HTML, and the globals ``raise_exception``, ``strftime_now``, ``dict``
and ``namespace``. The ``{% generation %}`` tag (transformers' assistant masks) renders its body
unchanged, as transformers does when it is not tracking. The special-token strings a template
reads (``bos_token``, ``eos_token``, ...) are passed as transformers passes them: only those the
tokenizer defines.
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
  """The template itself raised (e.g. ``raise_exception`` on roles it does not allow)."""


class _GenerationTag(jinja2.ext.Extension):
  """``{% generation %}...{% endgeneration %}``: renders the body (transformers' untracked path)."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

  def _body(self, caller):
    return caller()


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # Jinja's own tojson escapes <, >, & for HTML; chat templates expect plain JSON.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(format):
  return datetime.datetime.now().strftime(format)


class _TemplateNamespace(jinja2.utils.Namespace):
  """`namespace` without underscore attributes (transformers' guard against sandbox escapes)."""

  def __init__(*args, **kwargs):
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _TemplateNamespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _TemplateNamespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _TemplateDict:
  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
  """The template compiled in transformers' environment (cached: the same text compiles once)."""
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                     extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  env.globals["dict"] = _TemplateDict()
  env.globals["namespace"] = _TemplateNamespace
  return env.from_string(source)


def render(source: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool,
           special_tokens: Mapping[str, str | None], **variables: Any) -> str:
  """The template's text for `messages`, as ``apply_chat_template(..., tokenize=False)``.

  Args:
    source: the Jinja template text.
    messages: ``[{"role": ..., "content": ...}]`` (copied: a template never sees our objects).
    add_generation_prompt: whether to open an assistant turn at the end.
    special_tokens: ``{"bos_token": "<s>", ...}``; None values are left undefined, as
      transformers leaves a token the tokenizer does not have.
    **variables: more template variables (``date_string``, ``enable_thinking``, ...).

  Raises:
    TemplateError: the template raised (``raise_exception``, an undefined value it indexes).
    jinja2.TemplateSyntaxError: the text is not a Jinja template.
  """
  template = compile_template(source)
  context = {name: value for name, value in special_tokens.items() if value is not None}
  context.update(variables)
  try:
    return template.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                           add_generation_prompt=add_generation_prompt, **context)
  except jinja2.exceptions.TemplateSyntaxError:
    raise
  except jinja2.exceptions.TemplateError as e:
    raise TemplateError(str(e)) from None
