"""Runs that keep their word, in process: the workdir lock, resume rules and config history,
parent stages, config checks, readable config errors and the error policy (jaxlm/errors.py,
workdir_lock.py, resume.py, config_checks.py, cli.py, stage.open_run / check_parents).

The same behaviours through the real command lines are in tests/test_run_commands.py."""

import json
import logging
import os
import subprocess
import sys

import pytest

from jaxlm import cli
from jaxlm import config_checks
from jaxlm import errors
from jaxlm import resume
from jaxlm import stage
from jaxlm import workdir_lock

from conftest import ROOT


def tiny_config(name="pretrain", *overrides):
  return cli.load_config(os.path.join(ROOT, f"configs/{name}.py:tiny"), overrides)


def snapshot(directory):
  """{relative path: (size, mtime_ns)} of every file under `directory`."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      stat = os.stat(path)
      out[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns)
  return out


# --- The workdir lock ---------------------------------------------------------------------------


def test_a_second_holder_is_refused_naming_the_first_and_may_take_over_after_release(tmp_path):
  first = workdir_lock.WorkdirLock(tmp_path).acquire()
  with pytest.raises(errors.RunDirError, match=rf"{tmp_path} is in use by pid {os.getpid()} on \S+ since 20"):
    workdir_lock.WorkdirLock(tmp_path).acquire()
  first.release()
  assert (tmp_path / ".lock").read_text() == ""  # A clean release leaves no holder behind.
  workdir_lock.WorkdirLock(tmp_path).acquire().release()


def test_a_lock_held_by_another_process_is_refused(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; from jaxlm import workdir_lock\n"
      f"workdir_lock.WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)")],
      stdout=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(errors.RunDirError, match=f"in use by pid {holder.pid} "):
      workdir_lock.WorkdirLock(tmp_path).acquire()
  finally:
    holder.kill()
    holder.wait()
  # The kernel released the killed holder's lock: taken over, with a warning naming it.
  lock = workdir_lock.WorkdirLock(tmp_path)
  assert lock.holder()["pid"] == holder.pid
  lock.acquire()
  assert lock.holder()["pid"] == os.getpid()
  lock.release()


def test_a_stale_holder_is_named_in_a_warning(tmp_path, caplog):
  (tmp_path / ".lock").write_text(json.dumps({"pid": 999999, "host": "elsewhere", "since": "then"}))
  with caplog.at_level(logging.WARNING):
    workdir_lock.WorkdirLock(tmp_path).acquire().release()
  assert "took over the lock of pid 999999 on elsewhere since then, which is gone" in caplog.text


# --- Resume rules and history -------------------------------------------------------------------


def test_resume_lists_every_refused_change_and_accepts_free_and_named_keys(tmp_path):
  old = tiny_config()
  new = tiny_config("pretrain", "--config.data.source=jsonl:x.jsonl", "--config.total_steps=80",
                    "--config.log_every=7", "--config.mesh.fsdp=2")
  with pytest.raises(errors.RunDirError) as e:
    resume.check(str(tmp_path), resume.plain_config(old), new)
  message = str(e.value)
  assert '  data.source: "world" -> "jsonl:x.jsonl"\n' in message and "  total_steps: 40 -> 80\n" in message
  assert "log_every" not in message and "mesh" not in message  # Free keys are not listed.
  assert "--resume_changes=data.source,total_steps" in message and "another --workdir" in message
  changes = resume.check(str(tmp_path), resume.plain_config(old), new, ["data", "config.total_steps"])
  assert set(changes) == {"data.source", "total_steps", "log_every", "mesh.fsdp"}
  with pytest.raises(errors.ConfigError, match=r"names 'total_step', which is not a config key \(did you mean total_steps"):
    resume.check(str(tmp_path), resume.plain_config(old), new, ["total_step"])


def test_open_run_records_the_config_refuses_drift_and_keeps_history(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config()
  stage.open_run(config, workdir)
  history = [json.loads(line) for line in open(os.path.join(workdir, resume.HISTORY_FILE))]
  assert [row["event"] for row in history] == ["created"]
  os.makedirs(os.path.join(workdir, "checkpoints", "20"))  # Now the workdir holds a run.
  stage._HELD_LOCKS.pop().release()
  before = snapshot(workdir)
  changed = tiny_config("pretrain", "--config.total_steps=60")
  with pytest.raises(errors.RunDirError, match="total_steps: 40 -> 60"):
    stage.open_run(changed, workdir)
  stage._HELD_LOCKS.pop().release()
  after = snapshot(workdir)
  assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
  stage.open_run(changed, workdir, resume_changes=["total_steps"])
  stage._HELD_LOCKS.pop().release()
  history = [json.loads(line) for line in open(os.path.join(workdir, resume.HISTORY_FILE))]
  assert [row["event"] for row in history] == ["created", "resumed with changes"]
  assert history[1]["changes"] == {"total_steps": [40, 60]} and history[0]["config"]["total_steps"] == 40
  assert json.load(open(os.path.join(workdir, "config.json")))["total_steps"] == 60


def test_a_run_without_a_checkpoint_starts_over_with_a_new_config(tmp_path):
  workdir = tmp_path / "run"
  stage.open_run(tiny_config(), str(workdir))
  stage._HELD_LOCKS.pop().release()
  (workdir / "tokenizer.model").write_text("stale")
  (workdir / "notes.txt").write_text("mine")
  stage.open_run(tiny_config("pretrain", "--config.data.source=jsonl:x.jsonl"), str(workdir))
  stage._HELD_LOCKS.pop().release()
  assert not (workdir / "tokenizer.model").exists() and (workdir / "notes.txt").read_text() == "mine"
  rows = [json.loads(line) for line in (workdir / resume.HISTORY_FILE).read_text().splitlines()]
  assert rows[-1]["event"] == "restarted (no checkpoint)"


def test_a_workdir_of_another_stage_or_a_pipeline_is_refused_before_anything_is_written(tmp_path):
  (tmp_path / "pt").mkdir()
  (tmp_path / "pt" / "manifest.json").write_text(json.dumps({"stage": "pretrain", "complete": True}))
  before = snapshot(tmp_path)
  with pytest.raises(errors.RunDirError, match=r"holds a 'pretrain' run .* a sft run never reuses"):
    stage.open_run(tiny_config("sft", "--config.init_from=x"), str(tmp_path / "pt"))
  (tmp_path / "pipeline.json").write_text("{}")
  with pytest.raises(errors.RunDirError, match="is a pipeline's directory"):
    stage.open_run(tiny_config(), str(tmp_path))
  assert snapshot(tmp_path) == {**before, "pipeline.json": snapshot(tmp_path)["pipeline.json"]}


# --- Parents of the right stage -----------------------------------------------------------------


def fake_run(directory, stage_name, complete=True):
  directory.mkdir(parents=True)
  (directory / "manifest.json").write_text(json.dumps({"stage": stage_name, "complete": complete}))
  return str(directory)


def test_parents_must_be_complete_runs_of_an_accepted_stage(tmp_path):
  from experiments import ppo, sft
  reward = fake_run(tmp_path / "rm", "reward")
  config = tiny_config("sft", f"--config.init_from={reward}")
  with pytest.raises(errors.ParentError, match=r"init_from='.*rm' is a 'reward' run, but a sft run's init_from "
                                               r"must be a 'pretrain', 'sft' or 'import' run"):
    stage.check_parents(config, sft.PARENTS)
  unfinished = fake_run(tmp_path / "pt", "pretrain", complete=False)
  with pytest.raises(errors.ParentError, match="the pretrain run is incomplete"):
    stage.check_parents(tiny_config("sft", f"--config.init_from={unfinished}"), sft.PARENTS)
  with pytest.raises(errors.MissingError, match="no such run directory"):
    stage.check_parents(tiny_config("sft", f"--config.init_from={tmp_path / 'nowhere'}"), sft.PARENTS)
  sft_run = fake_run(tmp_path / "sft", "sft")
  wrong_reward = tiny_config("ppo", f"--config.init_from={sft_run}", f"--config.reward_from={sft_run}")
  with pytest.raises(errors.ParentError, match="reward_from=.* is a 'sft' run, but a ppo run's reward_from"):
    stage.check_parents(wrong_reward, ppo.PARENTS)
  stage.check_parents(tiny_config("ppo", f"--config.init_from={sft_run}", f"--config.reward_from={reward}"), ppo.PARENTS)
  # Directories the pipeline will make are not there yet: skipped.
  stage.check_parents(tiny_config("sft", f"--config.init_from={tmp_path / 'later'}"), sft.PARENTS,
                      produced=[str(tmp_path / "later")])


# --- Config values and keys ---------------------------------------------------------------------


@pytest.mark.parametrize("name, override, key", [
    ("pretrain", "--config.total_steps=-5", "total_steps"),
    ("pretrain", "--config.optimizer.schedule=cosin", "optimizer.schedule"),
    ("pretrain", "--config.optimizer.learning_rate=0.0", "optimizer.learning_rate"),
    ("pretrain", "--config.data.source=wrld", "data.source"),
    ("pretrain", "--config.data.invalid=ignore", "data.invalid"),
    ("pretrain", "--config.mesh.fsdp=0", "mesh.fsdp"),
    ("pretrain", "--config.model.num_kv_heads=3", "model"),
    ("pretrain", "--config.tokenizer.model_type=wordpiece", "tokenizer.model_type"),
    ("sft", "--config.num_microbatches=3", "num_microbatches"),
    ("dpo", "--config.loss.name=kto", "loss.name"),
    ("ppo", "--config.alarms.action=panic", "alarms.action"),
    ("ppo", "--config.reward.weights.model=0", "reward.weights"),
    ("ppo", "--config.reward.clip=-1", "reward.clip"),
    ("reward", "--config.seq_len=4096", "seq_len"),
])
def test_every_stage_checks_its_values_before_running(name, override, key):
  module = __import__(f"experiments.{name}", fromlist=["check_config"])
  extra = [] if name == "pretrain" else ["--config.init_from=x", "--config.reward_from=r", "--config.value_from=sft"][:1 + 2 * (name == "ppo")]
  with pytest.raises(errors.ConfigError) as e:
    module.check_config(tiny_config(name, *extra, override))
  assert e.value.key == key and str(e.value).startswith(f"config.{key}")


def test_a_config_key_typo_names_the_closest_keys_and_a_bad_preset_names_the_file():
  with pytest.raises(errors.UserError, match=r"--config.optimizer.lrr: .* has no key 'optimizer.lrr' "
                                             r"\(did you mean optimizer.learning_rate"):
    tiny_config("pretrain", "--config.optimizer.lrr=1")
  with pytest.raises(errors.UserError, match=r"no key 'loss.betta' \(did you mean loss.beta\?\)"):
    tiny_config("dpo", "--config.loss.betta=0.2")
  with pytest.raises(errors.UserError, match=r"pretrain.py:huge: unknown preset 'huge'"):
    cli.load_config(os.path.join(ROOT, "configs/pretrain.py:huge"))
  with pytest.raises(errors.UserError, match=r"--config.total_steps=abc: invalid literal for int"):
    tiny_config("pretrain", "--config.total_steps=abc")


def test_closest_keys_know_abbreviations_and_sections():
  keys = ["optimizer.learning_rate", "optimizer.b1", "total_steps", "eval.judge", "kl.coef"]
  assert errors.closest("optimizer.lrr", keys)[0] == "optimizer.learning_rate"
  assert errors.closest("totl_steps", keys) == ["total_steps"]
  assert errors.closest("eval.judg", keys) == ["eval.judge"]
  assert errors.closest("zzz", keys) == []


# --- The error policy ---------------------------------------------------------------------------


def test_the_guard_prints_one_error_line_for_user_errors_and_keeps_tracebacks_of_bugs(monkeypatch, capsys):
  monkeypatch.delenv("JAXLM_DEBUG", raising=False)
  monkeypatch.setattr(sys, "argv", ["tool"])

  def user():
    raise errors.ConfigError("total_steps", "got -5; expected a positive integer")

  with pytest.raises(SystemExit) as exit_info:
    errors.guard(user)()
  assert exit_info.value.code == errors.EXIT_USER_ERROR
  assert capsys.readouterr().err == "error: config.total_steps: got -5; expected a positive integer\n"

  def missing_file():
    open("/nonexistent/dir/file")

  with pytest.raises(SystemExit):
    errors.guard(missing_file)()
  assert capsys.readouterr().err.startswith("error: /nonexistent/dir/file: No such file or directory")
  with pytest.raises(KeyError):  # A programming error keeps its traceback.
    errors.guard(lambda: {}["x"])()
  monkeypatch.setenv("JAXLM_DEBUG", "1")
  with pytest.raises(errors.ConfigError):
    errors.guard(user)()


def test_config_checks_accept_every_shipped_preset():
  for name in ("pretrain", "sft", "reward", "dpo", "ppo", "grpo"):
    module = __import__(f"experiments.{name}", fromlist=["check_config"])
    for preset in ("tiny", "cpu", "gpt2_124m", "1b"):
      extra = [] if name == "pretrain" else ["--config.init_from=x"]
      if name == "ppo":
        extra.append("--config.reward_from=r")
      module.check_config(cli.load_config(os.path.join(ROOT, f"configs/{name}.py:{preset}"), extra))
  config_checks.check_source("data.source", "tfds:hh_rlhf/harmless:train")


def test_a_warmup_longer_than_the_run_is_a_config_error():
  from experiments import sft
  config = tiny_config("sft", "--config.init_from=x", "--config.total_steps=4", "--config.optimizer.warmup_steps=5")
  with pytest.raises(errors.ConfigError, match=r"optimizer.warmup_steps.*5 exceeds config.total_steps=4"):
    sft.check_config(config)


# --- Held-out prompts ---------------------------------------------------------------------------


class Chats(list):
  """A stand-in for a validation RecordSource of chat records."""
  kind = "chat"
  description = "test chats"


def test_eval_prompts_uses_every_prompt_when_there_are_fewer_than_asked(caplog):
  chats = Chats({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
                for i in range(30))
  config = tiny_config("sft", "--config.init_from=x", "--config.data.source=jsonl:chats.jsonl",
                       "--config.eval.num_prompts=64")
  with caplog.at_level(logging.INFO):
    prompts = stage.eval_prompts(config, chats)
  assert [p["prompt"][0]["content"] for p in prompts] == [f"q{i}" for i in range(30)]
  assert "eval prompts: 30 of 30" in caplog.text and "all of them" in caplog.text
  config = tiny_config("sft", "--config.init_from=x", "--config.data.source=jsonl:chats.jsonl",
                       "--config.eval.num_prompts=4")
  prompts = stage.eval_prompts(config, chats)
  assert [p["prompt"][0]["content"] for p in prompts] == ["q0", "q10", "q19", "q29"]
  assert stage.spread(30, 64) == list(range(30)) and stage.spread(5, 1) == [0] and stage.spread(0, 3) == []


# --- Counts and skipped records in the run directory ----------------------------------------------


def test_skipped_records_and_counts_reach_the_manifest_and_skipped_jsonl(tmp_path, world_tokenizer):
  from jaxlm import checkpoint
  from jaxlm.data import sources

  chat = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! " * 40}]}
  lines = [json.dumps(chat)] * 199 + ['{"messages": [{"role": "user", "content": "no reply"}]}']
  data = tmp_path / "chats.jsonl"
  data.write_text("\n".join(lines) + "\n")
  source = sources.open_source(f"jsonl:{data}", "chat", "train", cache_dir=str(tmp_path / "cache"),
                               invalid="skip", max_invalid_fraction=0.01)
  run = checkpoint.RunDir(tmp_path / "run")
  os.makedirs(run.workdir)
  run.write_manifest(stage="sft", parent=None, config={}, tokenizer_hash="x", data_source=source.description)
  flat = stage.DataAccount(world_tokenizer, {"train": ("sft", source, dict(max_len=32))}).record(run)
  manifest = run.read_manifest()
  assert manifest["data"]["invalid_skipped"] == 1 == flat["data/invalid_skipped"]
  counts = manifest["data"]["pipelines"]["train"]
  assert counts["seen"] == flat["data/train/seen"] > 0 and counts["truncated"] == counts["seen"]  # 32 tokens cut every chat.
  skipped = [json.loads(line) for line in open(os.path.join(run.workdir, "skipped.jsonl"))]
  assert len(skipped) == 1 and skipped[0]["where"] == f"{data}:200" and "assistant" in skipped[0]["reason"]


def test_a_win_rate_without_a_judge_or_gold_reward_is_refused_before_generating():
  from jaxlm import policy_eval

  prompts = [{"prompt": [{"role": "user", "content": "hi"}], "meta": {}}]
  with pytest.raises(errors.ConfigError, match=r"config.eval.judge: a win rate against the baseline needs a judge"):
    policy_eval.PolicyEvaluator(None, None, None, prompts, max_new_tokens=4, rng=None)
