"""Reports over run directories: the plots and tables a researcher reads instead of JSON.

Pure functions from run directories (manifest.json, metrics.jsonl, samples.jsonl: see
`jaxlm.checkpoint` and `jaxlm.metrics`) to matplotlib figures and markdown. Nothing here imports
JAX, so a report builds on any machine that has the files (`python tools/report.py DIR`).

  runs = report.discover_runs("runs/demo")      # every sub-directory with a manifest.json
  report.write_report(runs, "runs/demo")        # report.md + losses.png, gold_vs_kl.png, ...

What is read, per stage; a missing file, key or stage leaves its part out and never fails:

  every stage   manifest: stage, parent, complete, sessions, wall_time_s, final_metrics (the
                headline table, `HEADLINES`); metrics.jsonl: `loss`, `val_loss`
  reward        metrics.jsonl: `accuracy` (training), `val_accuracy`, `val_label_ceiling`
  ppo, grpo     per-iteration rows: `reward`, `gold_reward`, `kl`, `length`, `entropy`,
                `policy_loss` (and PPO's `value_loss`)
  ppo, grpo, dpo  policy-evaluation rows (rows with `well_formed`, keys optionally prefixed
                `eval_`): `gold_reward`, `kl`, `win_rate`, `length`; final_metrics `reference_*`:
                the SFT model sampled on the same prompts (the KL-0 point)
  sft/ppo/grpo/dpo  samples.jsonl: {"step", "prompt": [messages], "reply", "gold_reward", ...}
  pretrain      samples.jsonl: {"step", "prompt": "text prefix", "completion"}

Figures are drawn on matplotlib's Agg canvas (`matplotlib.figure.Figure`, never pyplot), so no
display and no global pyplot state are involved.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

STAGE_ORDER = ("pretrain", "sft", "reward", "ppo", "grpo", "dpo")

# The headline numbers of each stage (final_metrics keys): (key, label, compared with, its label).
# "Compared with" is another final_metrics key or a constant: the number that makes the first
# one mean something (the parent before SFT, the labels' ceiling, SFT itself, chance).
HEADLINES = {
    "pretrain": [("val_loss", "val loss", None, None), ("val_perplexity", "val perplexity", None, None),
                 ("fact_choice_accuracy", "facts, multiple choice", "fact_choice_chance", "chance"),
                 ("fact_accuracy", "facts, exact completion", None, None)],
    "sft": [("val_loss", "held-out chat loss", None, None),
            ("well_formed", "well-formed replies", "parent_well_formed", "parent"),
            ("correct", "correct answers", "parent_correct", "parent"),
            ("gold_reward", "gold reward", "parent_gold_reward", "parent")],
    "reward": [("val_accuracy", "held-out accuracy", "val_label_ceiling", "label ceiling"),
               ("val_accuracy_vs_ceiling", "accuracy / ceiling", 1.0, "perfect"),
               ("val_gold_accuracy", "agreement with gold", 0.5, "chance"),
               ("val_gold_pearson", "gold reward correlation (Pearson)", None, None),
               ("val_gold_spearman", "gold reward correlation (Spearman)", None, None)],
}
POLICY_HEADLINES = [("gold_reward", "gold reward", "reference_gold_reward", "SFT"),
                    ("win_rate", "win rate vs SFT", 0.5, "tie"),
                    ("kl", "KL to SFT (nats/reply)", 0.0, "SFT"),
                    ("length", "reply length (tokens)", "reference_length", "SFT"),
                    ("well_formed", "well-formed replies", "reference_well_formed", "SFT"),
                    ("correct", "correct answers", "reference_correct", "SFT")]
HEADLINES.update(ppo=POLICY_HEADLINES, grpo=POLICY_HEADLINES, dpo=POLICY_HEADLINES)
LOSS_LABELS = {"loss": "training", "val_loss": "held-out", "policy_loss": "policy (clipped surrogate)",
               "value_loss": "value"}
RL_STAGES = ("ppo", "grpo")  # on-policy stages: per-iteration rollout rows
PPO_PANELS = (("reward", "reward (PPO: the reward model's; GRPO: the weighted rewards)"), ("gold_reward", "gold reward"),
              ("kl", "KL to SFT (nats/reply)"), ("length", "reply length (tokens)"),
              ("entropy", "entropy (nats/token)"))


# ------------------------------------------------------------------------------------------------
# Reading run directories.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  """One stage run's files, as read from its directory."""

  name: str
  workdir: str
  manifest: dict
  metrics: list[dict]
  samples: list[dict]

  @property
  def stage(self) -> str:
    return self.manifest.get("stage") or "?"

  @property
  def final(self) -> dict:
    return self.manifest.get("final_metrics") or {}

  @property
  def label(self) -> str:
    return self.name if self.name == self.stage else f"{self.name} ({self.stage})"


def read_jsonl(path: str) -> list[dict]:
  """The JSON objects of a JSONL file ([] if absent); a line cut short by a kill is skipped."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict):
        rows.append(row)
  return rows


def read_manifest(workdir: str) -> dict | None:
  """manifest.json of a run directory, or None if there is none (or it is unreadable)."""
  try:
    with open(os.path.join(workdir, "manifest.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def load_run(workdir: str, name: str | None = None) -> Run:
  """Reads a run directory; raises FileNotFoundError when it has no manifest.json."""
  workdir = os.path.abspath(workdir)
  manifest = read_manifest(workdir)
  if manifest is None:
    raise FileNotFoundError(f"{workdir} is not a run directory (no readable manifest.json)")
  return Run(name=name or os.path.basename(workdir), workdir=workdir, manifest=manifest,
             metrics=read_jsonl(os.path.join(workdir, "metrics.jsonl")),
             samples=read_jsonl(os.path.join(workdir, "samples.jsonl")))


def discover_runs(root: str) -> list[Run]:
  """The run at `root`, or every immediate sub-directory of `root` that is a run, in stage order."""
  if read_manifest(root) is not None:
    return [load_run(root)]
  names = sorted(os.listdir(root)) if os.path.isdir(root) else []
  runs = [load_run(os.path.join(root, n)) for n in names if read_manifest(os.path.join(root, n))]
  rank = {stage: i for i, stage in enumerate(STAGE_ORDER)}
  return sorted(runs, key=lambda run: (rank.get(run.stage, len(rank)), run.name))


def is_policy_eval(row: Mapping[str, Any]) -> bool:
  """Rows of `jaxlm.policy_eval` (SFT, DPO, PPO evaluations) always carry `well_formed`."""
  return "well_formed" in row or "eval_well_formed" in row


def policy_evals(run: Run) -> list[dict]:
  """The run's policy-evaluation rows, keys without the `eval_` prefix PPO gives them."""
  return [{k.removeprefix("eval_"): v for k, v in row.items()} for row in run.metrics if is_policy_eval(row)]


def training_rows(run: Run) -> list[dict]:
  # PPO's iteration rows share key names (kl, length) with its evaluations: keep them apart.
  return [row for row in run.metrics if not is_policy_eval(row)]


def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the rows that have a finite number under `key`."""
  pairs = [(row["step"], row[key]) for row in rows
           if isinstance(row.get(key), (int, float)) and math.isfinite(row[key]) and "step" in row]
  if not pairs:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*pairs)
  return np.asarray(steps, float), np.asarray(values, float)


# ------------------------------------------------------------------------------------------------
# Markdown.
# ------------------------------------------------------------------------------------------------
def fmt(value: Any) -> str:
  """A number for a table: 3 decimals below 10, 1 decimal below 1000, then integers."""
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "–"
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return str(value)
  if isinstance(value, int):
    return f"{value:,}"
  if abs(value) >= 1000:
    return f"{value:,.0f}"
  return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


def duration(seconds: Any) -> str:
  if not isinstance(seconds, (int, float)):
    return "–"
  minutes, secs = divmod(int(round(seconds)), 60)
  return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def cell(text: Any, limit: int = 200) -> str:
  """Text made safe for one markdown table cell (pipes escaped, newlines as <br>), shortened."""
  text = str(text)
  if not text.strip():
    return "*(blank)*"
  if len(text) > limit:
    text = text[: limit - 1] + "…"
  return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def headline_rows(run: Run) -> list[tuple[str, str, str]]:
  """(metric label, value, compared with) for each headline metric the run has."""
  rows = []
  for key, label, other, other_label in HEADLINES.get(run.stage, []):
    if key not in run.final:
      continue
    reference = run.final.get(other) if isinstance(other, str) else other
    rows.append((label, fmt(run.final[key]), f"{fmt(reference)} ({other_label})" if reference is not None else ""))
  return rows


def headline_table(runs: Sequence[Run]) -> str:
  rows = [(run.name, label, value, other) for run in runs for label, value, other in headline_rows(run)]
  return table(("run", "metric", "value", "compared with"), rows) if rows else "_No final metrics yet._"


def stages_table(runs: Sequence[Run], pipeline: Mapping[str, Any] | None = None) -> str:
  """One row per run: stage, parent, complete, sessions, time in the trainer and in the pipeline."""
  by_dir = {run.workdir: run.name for run in runs}
  stages = (pipeline or {}).get("stages", {})
  rows = []
  for run in runs:
    parent = run.manifest.get("parent")
    rows.append((run.name, run.stage, by_dir.get(parent, parent or "–"),
                 "yes" if run.manifest.get("complete") else "**no**", run.manifest.get("sessions", "–"),
                 fmt(run.final.get("steps")), duration(run.manifest.get("wall_time_s")),
                 duration(stages.get(run.name, {}).get("wall_s"))))
  return table(("run", "stage", "parent", "complete", "sessions", "steps", "trainer time",
                "pipeline time"), rows)


def aligned(runs: Sequence[Run]) -> list[Run]:
  return [run for run in runs if run.stage in RL_STAGES + ("dpo",)]


def alignment_table(runs: Sequence[Run]) -> str | None:
  """SFT against PPO, GRPO and DPO on the same held-out prompts (all sampled at the eval temperature)."""
  policies = [run for run in aligned(runs) if "gold_reward" in run.final or "win_rate" in run.final]
  if not policies:
    return None
  keys = ("gold_reward", "win_rate", "kl", "length", "well_formed", "correct")
  sft = {k: policies[0].final.get(f"reference_{k}") for k in keys}
  sft.update(win_rate=0.5, kl=0.0)  # The reference against itself, by definition.
  rows = [["SFT (reference)"] + [fmt(sft[k]) for k in keys]]
  rows += [[run.label] + [fmt(run.final.get(k)) for k in keys] for run in policies]
  return table(("policy", "gold reward", "win rate vs SFT", "KL to SFT", "length", "well-formed",
                "correct"), rows)


def prompt_key(prompt: Any) -> str:
  return json.dumps(prompt, sort_keys=True)


def last_eval_samples(run: Run) -> dict[str, dict]:
  """The rows of the run's last evaluation that answer a chat prompt, keyed by the prompt."""
  rows = [r for r in run.samples if isinstance(r.get("prompt"), list) and "reply" in r]
  if not rows:
    return {}
  last = max(r.get("step", 0) for r in rows)
  return {prompt_key(r["prompt"]): r for r in rows if r.get("step", 0) == last}


def render_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
  """The last user message, saying how many turns came before it."""
  last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
  if last is None:
    return ""
  earlier = sum(1 for m in messages[:last] if m.get("role") != "system")
  return (f"(+{earlier} earlier turns) " if earlier else "") + str(messages[last].get("content", ""))


def replies_table(runs: Sequence[Run], max_prompts: int = 6) -> str | None:
  """Every stage's reply to the same prompts, side by side (the last evaluation of each)."""
  columns = [(run, last_eval_samples(run)) for run in runs]
  columns = [(run, rows) for run, rows in columns if rows]
  if not columns:
    return None
  # Prompts that most runs answered first (those are the comparisons), then in order of appearance.
  counts = collections.Counter(key for _, rows in columns for key in rows)
  order = sorted(counts, key=lambda key: -counts[key])
  body = []
  for key in order[:max_prompts]:
    line = [cell(render_prompt(json.loads(key)), 160)]
    for _, rows in columns:
      row = rows.get(key)
      if row is None:
        line.append("–")
        continue
      reply = cell(row["reply"]) + ("" if row.get("ended_turn", True) else " *(no end of turn)*")
      if isinstance(row.get("gold_reward"), (int, float)):
        reply += f"<br>*gold {fmt(row['gold_reward'])}*"
      line.append(reply)
    body.append(line)
  return table(["prompt"] + [f"{run.name}" for run, _ in columns], body)


def completions_table(runs: Sequence[Run], limit: int = 4) -> str | None:
  """Text completions (pretraining samples) of each run's last sample step."""
  body = []
  for run in runs:
    rows = [r for r in run.samples if isinstance(r.get("prompt"), str) and "completion" in r]
    last = max((r.get("step", 0) for r in rows), default=None)
    body += [(run.name, cell(r["prompt"], 120), cell(r["completion"]))
             for r in rows if r.get("step", 0) == last][:limit]
  return table(("run", "prefix", "completion"), body) if body else None


# ------------------------------------------------------------------------------------------------
# Figures.
# ------------------------------------------------------------------------------------------------
def new_figure(panels: int, *, ncols: int = 3, size: tuple[float, float] = (4.4, 3.2)) -> tuple[Figure, list]:
  """A figure on the Agg canvas with `panels` axes in rows of `ncols` (unused cells hidden)."""
  ncols = min(ncols, panels)
  nrows = -(-panels // ncols)
  fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
  FigureCanvasAgg(fig)  # The Agg canvas: PNGs without a display.
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
  for ax in axes[panels:]:
    ax.set_axis_off()
  return fig, axes[:panels]


def style_axes(ax, *, title: str, xlabel: str, ylabel: str | None = None, legend: bool = True) -> None:
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  ax.grid(alpha=0.3)
  if legend:
    ax.legend(fontsize=8)


def plot_losses(runs: Sequence[Run]) -> Figure | None:
  """One panel per run: training loss (line) and held-out loss (points); PPO's two losses."""
  curves = [(run, [(key, *series(run.metrics, key)) for key in LOSS_LABELS]) for run in runs]
  curves = [(run, [c for c in lines if c[1].size]) for run, lines in curves]
  curves = [(run, lines) for run, lines in curves if lines]
  if not curves:
    return None
  fig, axes = new_figure(len(curves))
  for ax, (run, lines) in zip(axes, curves):
    for key, steps, values in lines:
      held_out = key.startswith("val_")
      ax.plot(steps, values, marker="o" if held_out or steps.size < 3 else None, ms=4,
              lw=1.5 if held_out else 1.0, label=LOSS_LABELS[key])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    style_axes(ax, title=f"{run.label}: loss", xlabel="iteration" if run.stage in RL_STAGES else "step")
  return fig


def plot_reward_accuracy(runs: Sequence[Run]) -> Figure | None:
  """Held-out pairwise accuracy over steps against the labels' ceiling and chance."""
  models = [run for run in runs if run.stage == "reward" and series(run.metrics, "val_accuracy")[0].size]
  if not models:
    return None
  fig, (ax,) = new_figure(1, size=(6.4, 4.0))
  for i, run in enumerate(models):
    color = f"C{i}"
    prefix = f"{run.name}: " if len(models) > 1 else ""
    steps, values = series(run.metrics, "accuracy")
    if steps.size:
      ax.plot(steps, values, color=color, alpha=0.35, lw=1, label=f"{prefix}training batches")
    steps, values = series(run.metrics, "val_accuracy")
    ax.plot(steps, values, color=color, marker="o", label=f"{prefix}held-out accuracy")
    steps, gold = series(run.metrics, "val_gold_accuracy")
    if steps.size:
      ax.plot(steps, gold, color=color, marker="s", ls=":", label=f"{prefix}agreement with gold")
    ceiling = run.final.get("val_label_ceiling")
    if ceiling is None:
      ceiling = (series(run.metrics, "val_label_ceiling")[1][-1:].tolist() or [None])[0]
    if ceiling is not None:
      ax.axhline(ceiling, color=color, ls="--", label=f"{prefix}label ceiling ({ceiling:.3f})")
  ax.axhline(0.5, color="gray", ls=":", lw=1, label="chance")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  style_axes(ax, title="Reward model: pairwise accuracy", xlabel="step", ylabel="accuracy")
  return fig


def plot_ppo(runs: Sequence[Run]) -> Figure | None:
  """PPO's and GRPO's rollouts over iterations (reward, gold reward, KL, length, entropy); evals as points."""
  ppo_runs = [run for run in runs if run.stage in RL_STAGES]
  sources = [rows for run in ppo_runs for rows in (training_rows(run), policy_evals(run))]
  panels = [(key, title) for key, title in PPO_PANELS if any(series(rows, key)[0].size for rows in sources)]
  if not panels:
    return None
  fig, axes = new_figure(len(panels))
  for ax, (key, title) in zip(axes, panels):
    for i, run in enumerate(ppo_runs):
      steps, values = series(training_rows(run), key)
      ax.plot(steps, values, color=f"C{i}", lw=1.2, label=f"{run.name} rollouts")
      steps, values = series(policy_evals(run), key)
      if steps.size:
        ax.plot(steps, values, color=f"C{i}", marker="o", ls="none", label=f"{run.name} held-out eval")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    style_axes(ax, title=title, xlabel="iteration")
  return fig


def sft_point(runs: Sequence[Run]) -> tuple[float, str] | None:
  """The SFT model's gold reward at KL 0: its samples in a PPO/DPO evaluation, else its own eval."""
  references = [run.final["reference_gold_reward"] for run in aligned(runs)
                if isinstance(run.final.get("reference_gold_reward"), (int, float))]
  if references:
    return float(np.mean(references)), "SFT (KL 0)"
  for run in runs:
    if run.stage == "sft" and isinstance(run.final.get("gold_reward"), (int, float)):
      return float(run.final["gold_reward"]), "SFT (KL 0, its own eval)"
  return None


def plot_gold_vs_kl(runs: Sequence[Run]) -> Figure | None:
  """Gold reward against KL to SFT: the reward/divergence trade-off of PPO, GRPO and DPO."""
  paths = []
  for run in aligned(runs):
    rows = [r for r in policy_evals(run)
            if isinstance(r.get("kl"), (int, float)) and isinstance(r.get("gold_reward"), (int, float))]
    if rows:
      paths.append((run, rows))
  sft = sft_point(runs)
  if not paths and sft is None:
    return None
  fig, (ax,) = new_figure(1, size=(6.4, 4.4))
  if sft is not None:
    ax.plot([0.0], [sft[0]], marker="*", ms=16, color="black", ls="none", label=sft[1])
  for i, (run, rows) in enumerate(paths):
    kl = [r["kl"] for r in rows]
    gold = [r["gold_reward"] for r in rows]
    ax.plot(kl, gold, color=f"C{i}", marker="o", ms=5, alpha=0.8, label=f"{run.label} evals")
    if sft is not None:  # Every policy starts as the SFT model: its path starts at the star.
      ax.plot([0.0, kl[0]], [sft[0], gold[0]], color=f"C{i}", ls=":", lw=1)
    ax.plot(kl[-1:], gold[-1:], color=f"C{i}", marker="o", ms=11)  # The final policy.
    ax.annotate(f"step {rows[-1]['step']}", (kl[-1], gold[-1]), textcoords="offset points",
                xytext=(6, 4), fontsize=8)
  ax.axvline(0.0, color="gray", lw=0.8, ls=":")
  style_axes(ax, title="Gold reward against KL to SFT (held-out prompts)",
             xlabel="KL(policy || SFT), nats per reply", ylabel="mean gold reward")
  return fig


def save_figure(fig: Figure, path: str) -> str:
  """Writes `fig` as a PNG at `path`; returns the path."""
  fig.savefig(path, dpi=110)
  return path


# ------------------------------------------------------------------------------------------------
# The report.
# ------------------------------------------------------------------------------------------------
FIGURES = (("losses.png", plot_losses, "Loss curves"),
           ("reward_accuracy.png", plot_reward_accuracy, "Reward model accuracy"),
           ("ppo.png", plot_ppo, "PPO and GRPO rollouts"),
           ("gold_vs_kl.png", plot_gold_vs_kl, "Gold reward against KL"))


def render_report(runs: Sequence[Run], figures: Mapping[str, str], *, title: str,
                  pipeline: Mapping[str, Any] | None = None) -> str:
  """report.md's text, given the figure files already written ({file name: caption})."""
  def image(name: str) -> str:
    return f"![{figures[name]}]({name})" if name in figures else ""

  parts = [f"# {title}",
           f"Built {datetime.datetime.now().isoformat(timespec='seconds')} from {len(runs)} run "
           f"directories. Stages not present are left out.",
           "## Runs", stages_table(runs, pipeline), "## Headline metrics", headline_table(runs)]
  alignment = alignment_table(runs)
  if alignment or "gold_vs_kl.png" in figures:
    parts += ["## Alignment: SFT, PPO, GRPO and DPO on the same held-out prompts",
              "Replies sampled at the evaluation temperature; the win rate is judged by the gold reward "
              "(or the evaluation judge), ties counting half; KL is the mean of log pi - log ref over "
              "the sampled replies.", alignment or "", image("gold_vs_kl.png")]
  curves = [image(name) for name in ("losses.png", "reward_accuracy.png", "ppo.png") if name in figures]
  if curves:
    parts += ["## Training curves"] + curves
  replies = replies_table(runs)
  if replies:
    parts += ["## Replies side by side",
              "Each stage's last evaluation, matched by prompt (SFT decodes greedily; PPO and DPO "
              "sample at the evaluation temperature).", replies]
  completions = completions_table(runs)
  if completions:
    parts += ["## Pretraining completions", completions]
  return "\n\n".join(p for p in parts if p) + "\n"


def write_report(runs: Sequence[Run], out_dir: str, *, title: str | None = None,
                 pipeline: Mapping[str, Any] | None = None) -> list[str]:
  """Writes report.md and its PNGs into `out_dir`; returns the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  written, figures = [], {}
  for name, plot, caption in FIGURES:
    fig = plot(runs)
    if fig is not None:
      written.append(save_figure(fig, os.path.join(out_dir, name)))
      figures[name] = caption
  text = render_report(runs, figures, title=title or f"jaxlm report: {os.path.abspath(out_dir)}",
                       pipeline=pipeline)
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write(text)
  return written + [path]


def headline_keys(stage: str) -> list[str]:
  """The stage's headline final_metrics keys (the default columns of tools/sweep.py's table)."""
  return [key for key, *_ in HEADLINES.get(stage, [])]
