"""The README's commands stay true: CI runs the README's test command verbatim."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ci_command() -> str:
  lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()]
  commands = [l for l in lines if l and not l.startswith("#") and not l.startswith(("set ", "cd "))]
  assert len(commands) == 1, f".ci/run should run exactly one command, found {commands}"
  return commands[0]


def test_ci_runs_the_readme_test_command_verbatim():
  readme = (ROOT / "README.md").read_text()
  quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  assert _ci_command() in quickstart.splitlines()


def test_readme_has_no_unfilled_placeholders():
  readme = (ROOT / "README.md").read_text()
  for placeholder in ("SOURCES_DETAILS", "WORLD_DETAILS", "TOKENIZER_DETAILS", "PIPELINE_BENCH", "HF_MEASURED_PLACEHOLDER",
                      "HF_PLAN_PLACEHOLDER"):
    assert placeholder not in readme
