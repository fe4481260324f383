"""jaxlm/report.py and tools/report.py on small run directories written by hand: no training,
a few seconds. Each stage writes the files its trainer writes (manifest.json, metrics.jsonl,
samples.jsonl) with the keys the report reads."""

import importlib.util
import json
import subprocess
import sys

import pytest

from jaxlm import report

from conftest import ROOT

PROMPT_A = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many legs has a cat?"}]
PROMPT_B = [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."},
            {"role": "user", "content": "And of France | Spain?"}]


def write_run(root, name, stage, *, parent=None, final=None, metrics=(), samples=(), complete=True):
  workdir = root / name
  workdir.mkdir(parents=True)
  manifest = {"stage": stage, "parent": str(root / parent) if parent else None, "complete": complete,
              "sessions": 1, "wall_time_s": 12.5, "final_metrics": final or {}}
  (workdir / "manifest.json").write_text(json.dumps(manifest))
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
  if samples:
    (workdir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
  return workdir


def policy_rows(step, gold, kl, prefix=""):
  """A policy evaluation row as policy_eval writes it (PPO prefixes its keys with eval_)."""
  row = {"num_prompts": 4.0, "well_formed": 0.5, "length": 12.0, "gold_reward": gold, "kl": kl, "win_rate": 0.6}
  return {"step": step, **{f"{prefix}{k}": v for k, v in row.items()}}


def reply(step, prompt, text, gold):
  return {"step": step, "prompt": prompt, "reply": text, "ended_turn": True, "length": 3, "gold_reward": gold}


def write_pipeline(root):
  """Five stages, as a pipeline run leaves them."""
  write_run(root, "pretrain", "pretrain",
            final={"val_loss": 1.44, "val_perplexity": 4.2, "fact_choice_accuracy": 0.41, "fact_choice_chance": 0.11},
            metrics=[{"step": 10, "loss": 5.0}, {"step": 20, "loss": 3.0}, {"step": 20, "val_loss": 3.1}],
            samples=[{"step": 20, "prompt": "The capital of France is", "completion": " Paris."}])
  write_run(root, "sft", "sft", parent="pretrain",
            final={"well_formed": 0.9, "parent_well_formed": 0.1, "gold_reward": 1.2, "parent_gold_reward": -2.0},
            metrics=[{"step": 0, "parent_well_formed": 0.1}, {"step": 10, "loss": 2.0}, {"step": 10, "val_loss": 2.1},
                     {"step": 10, **policy_rows(10, 1.2, 0.0)}],
            samples=[reply(5, PROMPT_A, "old reply", 0.0), reply(10, PROMPT_A, "Four.", 2.0),
                     reply(10, PROMPT_B, "Paris.", 1.0)])
  write_run(root, "reward", "reward", parent="sft",
            final={"val_accuracy": 0.62, "val_label_ceiling": 0.7, "val_gold_pearson": 0.5},
            metrics=[{"step": 5, "accuracy": 0.55, "loss": 0.69},
                     {"step": 5, "val_accuracy": 0.58, "val_label_ceiling": 0.7, "val_loss": 0.68},
                     {"step": 10, "val_accuracy": 0.62, "val_label_ceiling": 0.7, "val_loss": 0.66}])
  write_run(root, "ppo", "ppo", parent="sft",
            final={"gold_reward": 1.6, "win_rate": 0.6, "kl": 2.0, "reference_gold_reward": 1.1},
            metrics=[{"step": 1, "reward": 0.1, "kl": 0.5, "length": 20.0, "entropy": 1.1, "policy_loss": 0.1},
                     {"step": 2, "reward": 0.3, "kl": 1.5, "length": 18.0, "entropy": 1.0, "policy_loss": 0.05},
                     policy_rows(2, 1.6, 2.0, prefix="eval_")],
            samples=[reply(2, PROMPT_A, "Four legs.", 2.5)])
  write_run(root, "dpo", "dpo", parent="sft",
            final={"gold_reward": 1.4, "win_rate": 0.55, "kl": 3.0, "reference_gold_reward": 1.0,
                   "reference_length": 14.0},
            metrics=[{"step": 5, "loss": 0.69}, {"step": 5, "val_loss": 0.7, **policy_rows(5, 1.3, 1.0)},
                     {"step": 10, "val_loss": 0.6, **policy_rows(10, 1.4, 3.0)}],
            samples=[reply(10, PROMPT_B, "Paris | Madrid\nbye", 1.5), reply(10, PROMPT_A, "4", 2.0)])


def test_runs_are_found_in_stage_order_and_other_directories_are_ignored(tmp_path):
  write_pipeline(tmp_path)
  (tmp_path / "not_a_run").mkdir()
  assert [r.name for r in report.discover_runs(tmp_path)] == ["pretrain", "sft", "reward", "ppo", "dpo"]
  assert [r.name for r in report.discover_runs(tmp_path / "sft")] == ["sft"]  # A run directory itself.


def test_a_line_cut_short_by_a_kill_is_skipped(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
  assert report.read_jsonl(str(path)) == [{"step": 1, "loss": 2.0}]


def test_ppo_iteration_rows_and_evaluation_rows_are_kept_apart(tmp_path):
  write_pipeline(tmp_path)
  ppo = report.load_run(tmp_path / "ppo")
  assert report.series(report.training_rows(ppo), "kl")[1].tolist() == [0.5, 1.5]
  evals = report.policy_evals(ppo)
  assert [(r["step"], r["kl"], r["gold_reward"]) for r in evals] == [(2, 2.0, 1.6)]  # eval_ prefix removed


def test_full_report_has_every_plot_and_table(tmp_path):
  write_pipeline(tmp_path)
  written = report.write_report(report.discover_runs(tmp_path), tmp_path,
                                pipeline={"stages": {"sft": {"wall_s": 75.0}}})
  names = sorted(p.rsplit("/", 1)[-1] for p in written)
  assert names == ["gold_vs_kl.png", "losses.png", "ppo.png", "report.md", "reward_accuracy.png"]
  for name in names:
    assert (tmp_path / name).stat().st_size > 1000 or name == "report.md"
  text = (tmp_path / "report.md").read_text()
  for image in ("losses.png", "reward_accuracy.png", "ppo.png", "gold_vs_kl.png"):
    assert f"]({image})" in text
  assert "| sft | sft | pretrain | yes | 1 | – | 12s | 1m15s |" in text  # parent by name, pipeline time
  assert "| sft | well-formed replies | 0.900 | 0.100 (parent) |" in text
  assert "| reward | held-out accuracy | 0.620 | 0.700 (label ceiling) |" in text
  assert "| dpo | gold reward | 1.400 | 1.000 (SFT) |" in text
  assert "| SFT (reference) | 1.100 | 0.500 | 0.000 |" in text  # the KL-0 row, from PPO's reference eval
  assert "| ppo | 1.600 | 0.600 | 2.000 |" in text


def test_replies_are_matched_by_prompt_from_the_last_evaluation(tmp_path):
  write_pipeline(tmp_path)
  table = report.replies_table(report.discover_runs(tmp_path))
  lines = table.splitlines()
  assert lines[0] == "| prompt | sft | ppo | dpo |"
  # The prompt all three answered comes first; sft's step-5 reply is not its last evaluation.
  assert lines[2].startswith("| How many legs has a cat? | Four.<br>*gold 2.000* | Four legs.<br>*gold 2.500* | 4<br>")
  assert "old reply" not in table
  # Earlier turns are counted, pipes and newlines cannot break the table, missing replies are dashes.
  assert lines[3] == ("| (+2 earlier turns) And of France \\| Spain? | Paris.<br>*gold 1.000* | – | "
                      "Paris \\| Madrid<br>bye<br>*gold 1.500* |")


def test_missing_stages_leave_their_parts_out(tmp_path):
  write_run(tmp_path, "pretrain", "pretrain", final={"val_loss": 2.0}, metrics=[{"step": 1, "loss": 3.0}])
  write_run(tmp_path, "sft", "sft", parent="pretrain", complete=False)  # killed before any metrics
  written = report.write_report(report.discover_runs(tmp_path), tmp_path)
  assert sorted(p.rsplit("/", 1)[-1] for p in written) == ["losses.png", "report.md"]
  text = (tmp_path / "report.md").read_text()
  assert "| sft | sft | pretrain | **no** |" in text
  assert "Alignment" not in text and "Replies side by side" not in text


def test_sft_alone_gives_the_kl_zero_point(tmp_path):
  write_run(tmp_path, "sft", "sft", final={"gold_reward": 0.7})
  runs = report.discover_runs(tmp_path)
  assert report.sft_point(runs) == (0.7, "SFT (KL 0, its own eval)")
  assert report.plot_gold_vs_kl(runs) is not None


def test_numbers_and_cells_format_for_markdown():
  assert [report.fmt(v) for v in (None, float("nan"), 3, 0.12345, 150.08, 12345.6)] == \
      ["–", "–", "3", "0.123", "150.1", "12,346"]
  assert report.cell("a|b\nc") == "a\\|b<br>c"
  assert report.cell("   ") == "*(blank)*"
  assert report.cell("x" * 300, limit=10) == "x" * 9 + "…"


def load_tool():
  """tools/report.py as a module, for calling its `main` in this process."""
  spec = importlib.util.spec_from_file_location("tool_report", ROOT / "tools" / "report.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_tools_report_cli_builds_from_a_directory_or_named_runs(tmp_path, capsys):
  tool = load_tool()
  write_pipeline(tmp_path / "demo")
  assert tool.main([str(tmp_path / "demo")]) == 0
  assert (tmp_path / "demo" / "report.md").exists()
  assert capsys.readouterr().out.startswith("5 runs (pretrain, sft, reward, ppo, dpo) -> ")
  assert tool.main(["--runs", f"base={tmp_path / 'demo' / 'sft'}", f"b0.5={tmp_path / 'demo' / 'dpo'}",
                    "--out", str(tmp_path / "cmp")]) == 0
  assert "| b0.5 (dpo) | 1.400 |" in (tmp_path / "cmp" / "report.md").read_text()
  with pytest.raises(SystemExit, match="no readable manifest.json"):
    tool.main(["--runs", f"x={tmp_path}", "--out", str(tmp_path / "cmp")])
  with pytest.raises(SystemExit, match="no run directories"):
    tool.main([str(tmp_path / "cmp")])


@pytest.mark.parametrize("args", [[], ["--runs", "a=b"], ["dir", "--runs", "a=b", "--out", "x"]])
def test_tools_report_cli_usage_errors(args, capsys):
  with pytest.raises(SystemExit) as error:
    load_tool().main(args)
  assert error.value.code == 2 and "usage" in capsys.readouterr().err


def test_tools_report_runs_as_a_script(tmp_path):
  write_run(tmp_path, "sft", "sft", final={"gold_reward": 0.5})
  result = subprocess.run([sys.executable, "tools/report.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert (tmp_path / "report.md").exists()
