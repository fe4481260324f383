"""Whole-transcript preference pairs ({"chosen": text, "rejected": text}) become canonical records."""

import pytest

from jaxlm.data import schemas
from jaxlm.data.errors import DataError
from jaxlm.data.preference_text import split_shared_prefix


def test_hh_style_transcripts_split_at_the_last_shared_assistant_marker():
  chosen = "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: What is 2 + 2?\n\nAssistant: 4, of course."
  rejected = "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: What is 2 + 2?\n\nAssistant: 4 is wrong, Paris."
  prompt, a, b = split_shared_prefix(chosen, rejected, "p.jsonl:1")
  assert prompt == [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "What is 2 + 2?"}]
  # Both responses start with "4": the shared word stays in the responses, not in the prompt.
  assert (a, b) == ("4, of course.", "4 is wrong, Paris.")


def test_plain_texts_split_at_a_word_boundary_into_one_user_turn():
  prompt, a, b = split_shared_prefix("Name a fruit: apple", "Name a fruit: apricot", "p.jsonl:2")
  assert prompt == [{"role": "user", "content": "Name a fruit:"}]
  assert (a, b) == ("apple", "apricot")


@pytest.mark.parametrize("chosen, rejected, message", [
    ("same", "same", "identical"),
    ("apple pie", "banana", "share no prompt"),
    ("Human: x\n\nAssistant:", "Human: x\n\nAssistant: yes", "empty"),
    ("Human: x\n\nAssistant: a\n\nAssistant: b", "Human: x\n\nAssistant: a\n\nAssistant: c",
     "must end with a user turn"),
])
def test_bad_pairs_name_the_record(chosen, rejected, message):
  with pytest.raises(DataError, match=f"p.jsonl:3.*{message}"):
    split_shared_prefix(chosen, rejected, "p.jsonl:3")


def test_validate_accepts_the_layout_and_keeps_other_fields_as_meta():
  record = schemas.validate("preference", {"chosen": "Human: Hi\nAssistant: Hello!",
                                           "rejected": "Human: Hi\nAssistant: Go away.", "source": "hh"},
                            "p.jsonl:4")
  assert record == {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!",
                    "rejected": "Go away.", "meta": {"source": "hh"}}


def test_text_before_the_first_marker_is_the_users():
  prompt, a, b = split_shared_prefix("Q: x\n\nAssistant: yes", "Q: x\n\nAssistant: no", "p.jsonl:5")
  assert prompt == [{"role": "user", "content": "Q: x"}] and (a, b) == ("yes", "no")
