"""tools/chat.py and tools/sample.py as a user runs them: subprocesses on the session's tiny
pretraining run (stdout, exit status, files written, errors that name the place)."""

import importlib.util
import json
import subprocess
import sys

import pytest

from jaxlm import inference
from jaxlm import sampling

from conftest import ROOT, stage_environment


def run_tool(name, *args, data_cache, stdin=""):
  return subprocess.run([sys.executable, f"tools/{name}.py", *map(str, args)], cwd=ROOT,
                        env=stage_environment(data_cache), input=stdin, capture_output=True,
                        text=True, timeout=300)


def load_tool(name):
  """The tool's module, for calling its `main` in this process (no new JAX start-up)."""
  spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_chat_one_shot_prints_just_the_reply(tiny_pretrain_run, data_cache):
  workdir = tiny_pretrain_run[0]
  result = run_tool("chat", "--workdir", workdir, "--prompt", "What is the capital of France?",
                    "--greedy", "--max_new_tokens", 16, data_cache=data_cache)
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(result.stdout) > 1  # A reply (a tiny model's may be only spaces), then the newline.
  # Exactly the library's reply, and nothing else on stdout.
  pieces = inference.stream_reply(inference.load_run(workdir),
                                  [{"role": "user", "content": "What is the capital of France?"}],
                                  sampling=sampling.SamplingConfig(greedy=True), max_new_tokens=16)
  assert result.stdout == "".join(pieces) + "\n"


def test_chat_interactive_answers_and_quits(tiny_pretrain_run, data_cache):
  result = run_tool("chat", "--workdir", tiny_pretrain_run[0], "--max_new_tokens", 8,
                    "--system", "Be brief.", data_cache=data_cache,
                    stdin="hello\n/reset\n\n/unknown\nhow are you?\n/quit\nnever read\n")
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(result.stdout.splitlines()) == 2  # one reply per message, commands say nothing
  assert "pretrain run" in result.stderr and "unknown command '/unknown'" in result.stderr
  assert "Traceback" not in result.stderr


def test_chat_bad_workdir_is_one_clear_line(tmp_path, data_cache):
  result = run_tool("chat", "--workdir", tmp_path, "--prompt", "hi", data_cache=data_cache)
  assert result.returncode == 2 and result.stdout == ""
  assert result.stderr.startswith(f"error: {tmp_path} is not a jaxlm run directory")
  assert "Traceback" not in result.stderr


def test_sample_writes_one_line_per_prompt(tiny_pretrain_run, data_cache, tmp_path):
  prompts = tmp_path / "prompts.jsonl"
  records = [{"prompt": "What is the capital of France?", "id": 1},
             {"prompt": [{"role": "user", "content": "Which animal says moo?"}], "meta": {"k": 2}},
             {"prompt": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi"}]}]
  # A blank line is skipped; the last line has no newline.
  prompts.write_text("\n".join(map(json.dumps, records[:2])) + "\n\n" + json.dumps(records[2]))
  output = tmp_path / "out" / "replies.jsonl"
  result = run_tool("sample", "--workdir", tiny_pretrain_run[0], "--prompts", prompts,
                    "--output", output, "--max_new_tokens", 12, "--batch_size", 2,
                    data_cache=data_cache)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = [json.loads(line) for line in output.read_text().splitlines()]
  assert len(rows) == 3
  for record, row in zip(records, rows):
    assert {k: row[k] for k in record} == record  # the input's fields, as given
    assert set(row) - set(record) == {"reply", "ended_turn", "num_tokens", "log_prob"}
    assert isinstance(row["reply"], str) and isinstance(row["ended_turn"], bool)
    assert 1 <= row["num_tokens"] <= 12 and row["log_prob"] < 0


def test_sample_num_samples_per_prompt(tiny_pretrain_run, tmp_path, capsys):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"prompt": "Bye"}) + "\n")
  output = tmp_path / "replies.jsonl"
  code = load_tool("sample").main(["--workdir", str(tiny_pretrain_run[0]), "--prompts",
                                   str(prompts), "--output", str(output), "--max_new_tokens", "8",
                                   "--num_samples_per_prompt", "3", "--temperature", "1.5"])
  assert code == 0, capsys.readouterr().err
  rows = [json.loads(line) for line in output.read_text().splitlines()]
  assert [(r["prompt"], r["sample_index"]) for r in rows] == [
      ("Hi", 0), ("Hi", 1), ("Hi", 2), ("Bye", 0), ("Bye", 1), ("Bye", 2)]
  assert len({r["reply"] for r in rows[:3]}) > 1  # separate draws, not one reply copied


@pytest.mark.parametrize("line, message", [
    ('{"prompt": [{"role": "bot", "content": "hi"}]}', "field 'prompt[0].role': unknown role"),
    ('{"prompt": ', "invalid JSON at column"),
    ('{"messages": []}', "missing field 'prompt'"),
    ('{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}',
     "must end with a user message"),
])
def test_sample_names_the_file_line_and_field_of_a_bad_prompt(tmp_path, capsys, line, message):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "fine"}\n' + line + "\n")
  output = tmp_path / "replies.jsonl"
  # Input is checked before the model is loaded, so no run directory is needed to fail.
  code = load_tool("sample").main(["--workdir", str(tmp_path / "unused"), "--prompts",
                                   str(prompts), "--output", str(output)])
  err = capsys.readouterr().err
  assert code == 1 and f"{prompts}:2: " in err and message in err
  assert not output.exists()


def test_sample_bad_line_in_a_subprocess_exits_nonzero(tmp_path, data_cache):
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": ""}\n')
  result = run_tool("sample", "--workdir", tmp_path, "--prompts", prompts, "--output",
                    tmp_path / "out.jsonl", data_cache=data_cache)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert f"{prompts}:1: field 'prompt[0].content': expected non-empty text" in result.stderr
