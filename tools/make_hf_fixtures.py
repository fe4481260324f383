r"""Write the small Hugging Face model directories under tests/fixtures/hf/ (run by hand, rarely).

  /path/to/env-with-torch-and-transformers/bin/python tools/make_hf_fixtures.py [--out=DIR]

The only jaxlm file that imports torch/transformers: the fixtures are what `transformers` itself
writes and computes, so jaxlm's import/export (`jaxlm/hf_checkpoint.py`) and its Hugging Face
tokenizer and chat formats are checked against transformers without the tests needing torch.
Regenerating is deterministic (fixed seeds; same torch/transformers/tokenizers versions give the
same bytes); the versions used are written to tests/fixtures/hf/VERSIONS.json.

One directory per family, each what `save_pretrained` writes plus three reference files:

  llama3        Llama 3.2 style: tied embeddings, GQA (4 heads, 2 kv), rope_scaling llama3,
                the Llama 3.2 Instruct chat template (written as chat_template.jinja)
  llama_untied  Llama 3.1 8B style: untied lm_head, plain RoPE, multi-head attention; the same
                Llama 3 tokenizer and template, but the template *inside* tokenizer_config.json
                (the pre-transformers-5 layout), so both layouts are tested
  qwen2         Qwen2.5 style: q/k/v bias, tied, config vocab_size (the embedding rows) larger
                than the tokenizer's vocabulary, the Qwen2.5 Instruct ChatML template with its
                default system prompt
  mistral       Mistral 7B v0.3 style: untied, head_dim (24) != hidden / heads (16), a
                SentencePiece-style (Metaspace, byte-fallback) BPE tokenizer, the v3 `[INST]`
                template
  qwen3         Qwen3 style: QK-norm, explicit head_dim (32) != hidden / heads, tied, the Qwen3
                template (thinking blocks)

Shapes: hidden 64, 2 layers, intermediate 128, vocabulary ~420-520. Weights are random with std
1/sqrt(fan_in) (embeddings 1/sqrt(hidden)), RMSNorm scales 1 + N(0, 0.1) and biases N(0, 0.1),
rather than transformers' N(0, 0.02) init: at 0.02 attention is nearly uniform and logits are
~0.1, so a wrong RoPE, a transposed head or a swapped norm moves logits by less than the 1e-4
parity tolerance; at this scale every such bug is O(1). Stored float32.

Reference files:
  reference.npz   input_ids [2, T] int32 (row 1 right-padded), attention_mask [2, T] int32,
                  logits_float32 [2, T, V] (model in float32), logits_bfloat16 [2, T, V] (the
                  model loaded with dtype=torch.bfloat16; its logits cast to float32)
  reference.json  the same inputs as lists, T, V, the transformers/torch versions
  chat_reference.json  for 7 fixed conversations: apply_chat_template(..., tokenize=True) ids and
                  the rendered text, with add_generation_prompt False and True (Llama 3 gets a
                  fixed date_string, so the ids do not depend on today's date)

Chat templates (the official Jinja text; each file's source recorded here):
  Llama 3.2 Instruct: ggerganov/llama.cpp models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja
    (commit 7b5e0803c84435e8005725d8f9ddceb5d1820443), llama.cpp's verbatim copy of
    meta-llama/Llama-3.2-3B-Instruct's tokenizer_config.json chat_template.
  Qwen2.5 Instruct: the Qwen/Qwen2.5-*-Instruct tokenizer_config.json chat_template as vendored
    verbatim ("Upstream Qwen2.5-Instruct template") in a public Rust project's chat-template
    module (found by exact-string code search; the same text, tool prompt aside, is in
    jacksonsc007/frugal-agent utils/others/chat_template.py).
  Mistral Instruct v0.3: the mistralai "v3" template of Mistral-7B-Instruct-v0.3 /
    Mistral-Large-Instruct-2407, from ggml-org/llama.cpp tests/test-chat-template.cpp (entry
    "Mistral-Large-Instruct-2407 (mistralai 'v3' template ...)"); note its quirk, kept: the
    system message is rendered only into the *last* message when that message is a user turn.
  Qwen3: ye-NX/llama.cpp (a llama.cpp fork) models/templates/Qwen-Qwen3-0.6B.jinja (commit
    b354d7c9ecb76c97c07098617cdebbdfffa2583e), llama.cpp's copy of Qwen/Qwen3-0.6B's template.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "hf")
DATE_STRING = "26 Jul 2024"  # Llama 3.2's template default when strftime_now is absent
SEQ_LEN = 10
VALID_LEN_ROW1 = 6

LLAMA32_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

MISTRAL_V3_TEMPLATE = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# The text the tiny tokenizers are trained on: the words of the conversations below and some
# prose, so that chat ids exercise merges, byte fallback and unicode.
CORPUS = """The quick brown fox jumps over the lazy dog. A helpful assistant answers questions.
Hello there! How are you today? I am fine, thank you. What is the capital of France? Paris.
You are a helpful assistant. Please answer briefly and politely. Tell me a short story.
Once upon a time, a small robot learned to count: one, two, three, 42, 1000, 2024.
The weather is sunny; the river flows to the sea. Cats and dogs play in the garden.
Grüße aus München! Ça va très bien, merci. naïve café résumé — déjà vu.
世界你好，今天天气很好。 こんにちは世界。 Привет, мир! 🚀 ✓ ★
def add(a, b):\n    return a + b\n# comments and code: x = [1, 2, 3]; print(x)
Questions, answers, assistants, users, systems: the conversation continues and ends.
"""
CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Hello there! How are you today?"}],
    [{"role": "user", "content": "Tell me a short story."},
     {"role": "assistant", "content": "Once upon a time, a small robot learned to count."},
     {"role": "user", "content": "And then?"},
     {"role": "assistant", "content": "It counted to 42 and stopped."}],
    [{"role": "system", "content": "Réponds en français."},
     {"role": "user", "content": "Grüße aus München! 世界你好 🚀"},
     {"role": "assistant", "content": "Ça va très bien — déjà vu ✓"}],
    [{"role": "user", "content": "  leading and trailing spaces  "},
     {"role": "assistant", "content": "  spaced answer \n"}],
    [{"role": "system", "content": ""},
     {"role": "user", "content": ""},
     {"role": "assistant", "content": ""}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Cats or dogs?"},
     {"role": "assistant", "content": "Cats."},
     {"role": "user", "content": "Why?"}],
]
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                  r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_bpe(pattern: str, vocab_size: int, nfc: bool) -> tokenizers.Tokenizer:
  """A GPT-2/Llama-3/Qwen style byte-level BPE: regex split, then bytes mapped to unicode."""
  tok = tokenizers.Tokenizer(models.BPE())
  if nfc:
    tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
  return tok


def llama3_tokenizer() -> transformers.PreTrainedTokenizerFast:
  tok = _byte_level_bpe(LLAMA3_PATTERN, 400, nfc=False)
  specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
              "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
              "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
  tok.add_special_tokens(specials)
  bos = tok.token_to_id("<|begin_of_text|>")
  tok.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                    special_tokens=[("<|begin_of_text|>", bos)])])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
      model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=True,
      model_max_length=131072)


def qwen_tokenizer(qwen3: bool) -> transformers.PreTrainedTokenizerFast:
  tok = _byte_level_bpe(QWEN_PATTERN, 420, nfc=True)
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
              "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
              "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
  tok.add_special_tokens(specials)
  plain = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
           "<|repo_name|>", "<|file_sep|>"]
  if qwen3:
    plain += ["<tool_response>", "</tool_response>", "<think>", "</think>"]
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in plain])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
      errors="replace", split_special_tokens=False, clean_up_tokenization_spaces=False,
      model_max_length=131072)


def mistral_tokenizer() -> transformers.PreTrainedTokenizerFast:
  """Mistral v0.3 style: SentencePiece BPE (Metaspace "▁", byte fallback), controls at ids 0..9."""
  specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
              "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
  byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
  ascii_alphabet = sorted(set(c for c in CORPUS if ord(c) < 128 and c != "\n") | {"▁"})
  trainer = trainers.BpeTrainer(vocab_size=520, show_progress=False, special_tokens=specials + byte_tokens,
                                initial_alphabet=ascii_alphabet, limit_alphabet=len(ascii_alphabet))
  tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                     special_tokens=[("<s>", tok.token_to_id("<s>"))])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
      additional_special_tokens=specials[3:], clean_up_tokenization_spaces=False, model_max_length=32768)


def _config_kwargs(tok: transformers.PreTrainedTokenizerFast) -> dict:
  return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, hidden_act="silu", max_position_embeddings=256, vocab_size=len(tok),
              attention_dropout=0.0, initializer_range=0.02)


def _rope(config_cls, theta: float, scaling: dict | None) -> dict:
  """rope settings in the spelling this transformers accepts (5.x: rope_parameters)."""
  if "rope_parameters" in config_cls.__init__.__code__.co_varnames:
    params = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    return {"rope_parameters": params}
  return {"rope_theta": theta, "rope_scaling": scaling}


def families() -> dict:
  """name -> (config, tokenizer, chat template, layout) for every fixture."""
  t = transformers
  llama_tok = llama3_tokenizer()
  out = {}
  cfg = t.LlamaConfig(**_config_kwargs(llama_tok), rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=llama_tok.bos_token_id, eos_token_id=llama_tok.convert_tokens_to_ids(
                          ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
                      **_rope(t.LlamaConfig, 500000.0, {"rope_type": "llama3", "factor": 8.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 32}))
  cfg.architectures = ["LlamaForCausalLM"]
  out["llama3"] = (t.LlamaForCausalLM, cfg, llama_tok, LLAMA32_TEMPLATE, "separate")
  cfg = t.LlamaConfig(**{**_config_kwargs(llama_tok), "num_key_value_heads": 4}, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=llama_tok.bos_token_id,
                      eos_token_id=llama_tok.eos_token_id, **_rope(t.LlamaConfig, 10000.0, None))
  cfg.architectures = ["LlamaForCausalLM"]
  out["llama_untied"] = (t.LlamaForCausalLM, cfg, llama3_tokenizer(), LLAMA32_TEMPLATE, "inline")
  qtok = qwen_tokenizer(qwen3=False)
  cfg = t.Qwen2Config(**{**_config_kwargs(qtok), "vocab_size": len(qtok) + 64}, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, use_sliding_window=False, sliding_window=256, max_window_layers=2,
                      bos_token_id=qtok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=qtok.eos_token_id,
                      **_rope(t.Qwen2Config, 1000000.0, None))
  cfg.architectures = ["Qwen2ForCausalLM"]
  out["qwen2"] = (t.Qwen2ForCausalLM, cfg, qtok, QWEN25_TEMPLATE, "separate")
  mtok = mistral_tokenizer()
  cfg = t.MistralConfig(**_config_kwargs(mtok), head_dim=24, rms_norm_eps=1e-5, tie_word_embeddings=False,
                        sliding_window=None, bos_token_id=1, eos_token_id=2, **_rope(t.MistralConfig, 1000000.0, None))
  cfg.architectures = ["MistralForCausalLM"]
  out["mistral"] = (t.MistralForCausalLM, cfg, mtok, MISTRAL_V3_TEMPLATE, "separate")
  q3tok = qwen_tokenizer(qwen3=True)
  cfg = t.Qwen3Config(**_config_kwargs(q3tok), head_dim=32, rms_norm_eps=1e-6, tie_word_embeddings=True,
                      attention_bias=False, use_sliding_window=False, sliding_window=None, max_window_layers=2,
                      bos_token_id=q3tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=q3tok.eos_token_id,
                      **_rope(t.Qwen3Config, 1000000.0, None))
  cfg.architectures = ["Qwen3ForCausalLM"]
  out["qwen3"] = (t.Qwen3ForCausalLM, cfg, q3tok, QWEN3_TEMPLATE, "separate")
  return out


def randomize(model: torch.nn.Module, seed: int) -> None:
  """Weights at a scale where every mapping bug shows (see the module docstring)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      else:  # Linear [out, in] and the embedding [V, E]: std 1/sqrt(in)
        p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def reference_inputs(vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=(2, SEQ_LEN)).astype(np.int32)
  mask = np.ones((2, SEQ_LEN), np.int32)
  mask[1, VALID_LEN_ROW1:] = 0
  ids[1, VALID_LEN_ROW1:] = 0  # right padding (any id; masked)
  return ids, mask


def logits_of(directory: str, ids: np.ndarray, mask: np.ndarray, dtype: torch.dtype) -> np.ndarray:
  model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
  model.eval()
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), attention_mask=torch.from_numpy(mask.astype(np.int64)))
  return out.logits.float().numpy()


def chat_reference(directory: str, name: str) -> list[dict]:
  tok = transformers.AutoTokenizer.from_pretrained(directory)
  extra = {"date_string": DATE_STRING} if name.startswith("llama") else {}
  rows = []
  for conv in CONVERSATIONS:
    row = {"messages": conv}
    for agp, key in ((False, ""), (True, "_generation_prompt")):
      ids = tok.apply_chat_template(conv, tokenize=True, add_generation_prompt=agp, return_dict=False, **extra)
      if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
      row["ids" + key] = [int(i) for i in ids]
      row["text" + key] = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=agp, **extra)
    rows.append(row)
  return rows


def write_family(out_dir: str, name: str, spec: tuple, seed: int) -> None:
  model_cls, cfg, tok, template, layout = spec
  directory = os.path.join(out_dir, name)
  if os.path.exists(directory):
    shutil.rmtree(directory)
  torch.manual_seed(seed)
  model = model_cls(cfg).float()
  randomize(model, seed)
  model.save_pretrained(directory, safe_serialization=True)
  tok.chat_template = template
  tok.save_pretrained(directory)
  if layout == "inline":  # the pre-transformers-5 layout: the template inside tokenizer_config.json
    jinja = os.path.join(directory, "chat_template.jinja")
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    with open(cfg_path) as f:
      tok_cfg = json.load(f)
    if os.path.exists(jinja):
      with open(jinja) as f:
        tok_cfg["chat_template"] = f.read()
      os.remove(jinja)
    with open(cfg_path, "w") as f:
      json.dump(tok_cfg, f, indent=2, ensure_ascii=False)
      f.write("\n")
  ids, mask = reference_inputs(len(tok), seed)
  f32 = logits_of(directory, ids, mask, torch.float32)
  bf16 = logits_of(directory, ids, mask, torch.bfloat16)
  np.savez(os.path.join(directory, "reference.npz"), input_ids=ids, attention_mask=mask,
           logits_float32=f32.astype(np.float32), logits_bfloat16=bf16.astype(np.float32))
  meta = {"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "seq_len": SEQ_LEN,
          "model_vocab_size": int(f32.shape[-1]), "tokenizer_vocab_size": len(tok),
          "logits": "reference.npz: logits_float32, logits_bfloat16 [2, T, V] float32",
          "transformers": transformers.__version__, "torch": torch.__version__}
  with open(os.path.join(directory, "reference.json"), "w") as f:
    json.dump(meta, f, indent=1)
    f.write("\n")
  with open(os.path.join(directory, "chat_reference.json"), "w") as f:
    json.dump({"date_string": DATE_STRING if name.startswith("llama") else None,
               "conversations": chat_reference(directory, name)}, f, indent=1, ensure_ascii=False)
    f.write("\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=DEFAULT_OUT)
  parser.add_argument("--only", default="", help="comma-separated fixture names (default: all)")
  args = parser.parse_args()
  torch.use_deterministic_algorithms(True)
  os.makedirs(args.out, exist_ok=True)
  specs = families()
  only = [n for n in args.only.split(",") if n]
  for seed, (name, spec) in enumerate(sorted(specs.items())):
    if only and name not in only:
      continue
    write_family(args.out, name, spec, seed=1000 + seed)
    print(f"wrote {os.path.join(args.out, name)}")
  with open(os.path.join(args.out, "VERSIONS.json"), "w") as f:
    json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
               "tokenizers": tokenizers.__version__, "generator": "tools/make_hf_fixtures.py"}, f, indent=1)
    f.write("\n")


if __name__ == "__main__":
  main()
