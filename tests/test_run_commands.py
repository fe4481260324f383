"""Runs that keep their word, through the real command lines (subprocesses): a bad data file, a
busy workdir, a resume with a changed config, a workdir or parent of the wrong stage, a typo in a
pipeline override. Each asserts the exit status, one `error:` line on stderr without a
traceback, and that nothing in the workdir changed; and the counts of what the data pipelines
kept, truncated and dropped, in the session's pipeline run."""

import json
import os
import subprocess
import time

from conftest import ROOT, stage_command, stage_environment
from test_run_integrity import snapshot


def run(command, env, timeout=300):
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(result, *fragments):
  """Exit status 2, exactly one `error:` line on stderr holding every fragment, no traceback."""
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  for fragment in fragments:
    assert fragment in result.stderr, (fragment, result.stderr[-3000:])


def loss_rows(path):
  """The metrics.jsonl rows of a run that hold training or validation numbers, in order."""
  rows = [json.loads(line) for line in open(path)]
  return [row for row in rows if any(k in row for k in ("loss", "val_loss"))]


def test_a_jsonl_with_a_misspelled_field_is_one_error_naming_the_line(tmp_path):
  data = tmp_path / "corpus.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "one"}, {"text": "two"}, {"txt": "three"}]))
  workdir = tmp_path / "run"
  result = run(stage_command("pretrain", workdir, f"--config.data.source=jsonl:{data}"),
               stage_environment(tmp_path / "cache"))
  assert_one_error_line(result, f"{data}:3: missing field 'text'")
  assert not workdir.exists()  # The data is read before the workdir is touched.


def test_one_writer_per_workdir_then_resume_keeps_its_config(tmp_path, tiny_pretrain_run):
  workdir = tmp_path / "run"
  env = stage_environment(tmp_path / "cache")
  first = subprocess.Popen(stage_command("pretrain", workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  try:
    lock = workdir / ".lock"
    deadline = time.monotonic() + 300
    while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
      assert first.poll() is None, first.stderr.read()[-3000:]
      time.sleep(0.1)
    start = time.monotonic()
    second = run(stage_command("pretrain", workdir), env)
    elapsed = time.monotonic() - start
    assert_one_error_line(second, f"{workdir} is in use by pid {first.pid} on ")
    assert elapsed < 30, elapsed  # Exits at start-up (about 10 s of it is importing JAX on a busy CI box).
    assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
  finally:
    if first.poll() is None:
      first.kill()
  # The first run was undisturbed: its numbers are those of the session's pipeline's same run.
  undisturbed, _ = tiny_pretrain_run
  assert loss_rows(workdir / "metrics.jsonl") == loss_rows(undisturbed / "metrics.jsonl")

  # Resuming with another data source is refused, and nothing in the run directory changes.
  before = snapshot(workdir)
  config = (workdir / "config.json").read_bytes()
  changed = run(stage_command("pretrain", workdir, "--config.data.source=text:/elsewhere/*.txt"), env)
  assert_one_error_line(changed, 'data.source: "world" -> "text:/elsewhere/*.txt"', "--resume_changes=data.source")
  assert (workdir / "config.json").read_bytes() == config
  assert {k: v for k, v in snapshot(workdir).items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}

  # Another stage never writes into it.
  other = run(stage_command("sft", workdir, f"--config.init_from={workdir}"), env)
  assert_one_error_line(other, "holds a 'pretrain' run", "never reuses another stage's directory")
  assert {k: v for k, v in snapshot(workdir).items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


def test_a_parent_of_the_wrong_stage_is_refused(tmp_path, tiny_reward_run):
  reward_dir, _ = tiny_reward_run
  workdir = tmp_path / "sft"
  result = run(stage_command("sft", workdir, f"--config.init_from={reward_dir}"), stage_environment(tmp_path / "c"))
  assert_one_error_line(result, f"config.init_from='{reward_dir}' is a 'reward' run, but a sft run's init_from "
                                "must be a 'pretrain', 'sft' or 'import' run")
  assert not workdir.exists()


def test_the_pipeline_checks_every_stage_config_before_running_any(tmp_path):
  start = time.monotonic()
  result = run([os.sys.executable, "-m", "experiments.pipeline", f"--workdir={tmp_path}", "--preset=tiny",
                "--override", "dpo.loss.betta=0.2"], stage_environment(tmp_path / "cache"))
  elapsed = time.monotonic() - start
  assert_one_error_line(result, "stage dpo: --config.loss.betta", "did you mean loss.beta?")
  assert elapsed < 30, elapsed
  assert not any((tmp_path / stage).exists() for stage in ("pretrain", "sft", "reward", "ppo", "dpo"))


def test_every_stage_counts_what_its_pipelines_kept_truncated_and_dropped(tiny_pipeline):
  for name in ("pretrain", "sft", "reward", "dpo", "ppo"):
    manifest = json.loads((tiny_pipeline.workdir / name / "manifest.json").read_text())
    counts = manifest["data"]["pipelines"]
    assert "train" in counts, name
    for split in counts.values():
      assert split["seen"] == split["kept"] + split["dropped"] > 0, name
      assert split["dropped"] == sum(split["dropped_by_reason"].values()), name
    rows = [json.loads(line) for line in open(tiny_pipeline.workdir / name / "metrics.jsonl")]
    assert any(row.get("data/train/seen") == counts["train"]["seen"] for row in rows), name
  # The reward model's pairs are longer than its 96 tokens now and then: counted, and warned about.
  reward = json.loads((tiny_pipeline.workdir / "reward" / "manifest.json").read_text())["data"]["pipelines"]["train"]
  assert reward["truncated"] + reward["dropped"] > 0.01 * reward["seen"]
  _, output = tiny_pipeline.stage("reward")
  assert "more than 1% truncated or dropped" in output


def test_chat_survives_bad_bytes_and_says_when_a_message_is_cut(tmp_path, tiny_sft_run):
  workdir, _ = tiny_sft_run
  text = b"hello\n\xff\xfe not utf-8\n" + b"word " * 4000 + b"\n"
  result = subprocess.run([os.sys.executable, "tools/chat.py", f"--workdir={workdir}", "--max_new_tokens=4"],
                          cwd=ROOT, input=text, capture_output=True, timeout=300)
  stderr = result.stderr.decode()
  assert result.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
  assert "input is not UTF-8 text; ignored (the conversation is kept)" in stderr
  assert "this message does not fit the context" in stderr and "the model sees only its last" in stderr


def test_ppo_normalises_with_a_real_estimate_and_logs_an_eta(tiny_pipeline):
  stats = json.loads((tiny_pipeline.workdir / "reward" / "reward_stats.json").read_text())
  assert stats["num_samples"] >= 64
  rows = [json.loads(line) for line in open(tiny_pipeline.workdir / "ppo" / "metrics.jsonl")]
  iterations = [row for row in rows if "kl" in row]
  assert iterations and all(abs(row["reward_model"]) < 10 and "reward_model_raw" in row for row in iterations)
  _, output = tiny_pipeline.stage("ppo")
  assert "s/iteration | ETA" in output


def test_a_workdir_that_cannot_be_made_is_one_error_line(tmp_path):
  (tmp_path / "a_file").write_text("")
  workdir = tmp_path / "a_file" / "run"
  result = run(stage_command("pretrain", workdir), stage_environment(tmp_path / "cache"))
  assert_one_error_line(result, f"{tmp_path / 'a_file'}", "Not a directory")
