"""The headroom of the synthetic world: what each training stage can gain on the gold reward.

Part of the design, not an afterthought: the demonstrations must score clearly below the best
style (room for RLHF over imitation) and the noisy preference labels must agree with the gold
reward often but not always (the ceiling of a reward model's accuracy). `headroom_report`
measures both per split; `tools/world_report.py` prints it. Re-exported by `jaxlm.data.world`.
"""

from __future__ import annotations

from jaxlm.data import world_chat
from jaxlm.data import world_core as C
from jaxlm.data import world_reward
from jaxlm.data import world_tasks as T


def _mean(xs) -> float:
  xs = list(xs)
  return sum(xs) / len(xs) if xs else float("nan")


def headroom_report(config: C.WorldConfig = C.WorldConfig(), num_per_split: int = 1000) -> dict:
  """How much each stage can gain, per split, on `num_per_split` records of each kind.

  The records are the first `num_per_split` of each (kind, split) stream: those `generate`
  yields, continued past the config's sizes when `num_per_split` is larger (the estimate is
  of the generator's distribution, which the sizes do not change).

  Returns:
    ``{split: {...}}`` with ``demo_reward``/``demo_correct`` (mean gold reward and accuracy of
    the chat demonstrations, every assistant turn scored against its own task), ``best_reward``/
    ``best_correct`` (the best style per prompt record), ``headroom`` (best - demo: what RLHF
    must win over imitation), ``label_agreement`` (fraction of preference labels that agree
    with gold: the ceiling of reward-model accuracy) and its expectation
    ``label_agreement_expected`` (mean Bradley-Terry probability), ``style_reward`` (mean gold
    reward of each style on the prompts) and the record counts.
  """
  report = {}
  for split in C.SPLITS:
    demo, demo_ok = [], []
    for record in world_chat.records("chat", split, config, num_per_split):
      for k, message in enumerate(m for m in record["messages"] if m["role"] == "assistant"):
        prompt = world_chat.prompt_record_from_chat(record, k)
        demo.append(world_reward.gold_reward(prompt, message["content"]))
        demo_ok.append(world_reward.is_correct(prompt, message["content"]))
    best, best_ok, by_style = [], [], {s: [] for s in T.STYLES}
    for record in world_chat.records("prompt", split, config, num_per_split):
      scored = {s: (world_reward.gold_reward(record, t), world_reward.is_correct(record, t))
                for s, t in world_chat.candidate_responses(record, config).items()}
      for style, (gold, _) in scored.items():
        by_style[style].append(gold)
      top = max(scored.values())
      best.append(top[0])
      best_ok.append(top[1])
    agree, expected = [], []
    for record in world_chat.records("preference", split, config, num_per_split):
      m = record["meta"]
      agree.append(m["label_agrees_gold"])
      margin = abs(m["gold_chosen"] - m["gold_rejected"]) / config.label_temperature
      expected.append(world_chat.sigmoid(margin))
    report[split] = {
        "demo_reward": _mean(demo), "demo_correct": _mean(demo_ok), "best_reward": _mean(best),
        "best_correct": _mean(best_ok), "headroom": _mean(best) - _mean(demo),
        "label_agreement": _mean(agree), "label_agreement_expected": _mean(expected),
        "style_reward": {s: _mean(v) for s, v in by_style.items()},
        "num_demo_turns": len(demo), "num_prompts": len(best), "num_preferences": len(agree)}
  return report
