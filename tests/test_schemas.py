"""Record schemas: canonical form, every rule with a clear error, and the TFDS round trip."""

import pytest

from jaxlm.data import schemas
from jaxlm.data.errors import DataError

USER = {"role": "user", "content": "What is 2 + 2?"}
ASSISTANT = {"role": "assistant", "content": "2 + 2 is 4."}

GOOD = {
    "text": {"text": "Paris is the capital of France."},
    "chat": {"messages": [{"role": "system", "content": "Be brief."}, USER, ASSISTANT], "meta": {"task": "add"}},
    "preference": {"prompt": [USER], "chosen": "4.", "rejected": "5.", "meta": {"gold_chosen": 1.0}},
    "prompt": {"prompt": [USER], "meta": {"answer": "4"}},
}


@pytest.mark.parametrize("kind", schemas.KINDS)
def test_good_records_are_canonical_and_round_trip_through_tfds(kind):
  record = schemas.validate(kind, GOOD[kind], "x.jsonl:1")
  assert record == GOOD[kind]
  features = schemas.tfds_features(kind)
  encoded = features.encode_example(schemas.to_tfds_example(kind, record))
  decoded = features.decode_example_np(encoded)
  assert schemas.from_tfds_example(kind, decoded) == record


def test_extra_top_level_keys_are_kept_in_meta():
  record = schemas.validate("prompt", {"prompt": [USER], "id": 7, "source": "web"}, "f:3")
  assert record["meta"] == {"id": 7, "source": "web"}


@pytest.mark.parametrize("kind, obj, message", [
    ("text", {"txt": "a"}, "missing field 'text'"),
    ("text", {"text": "   "}, "non-empty"),
    ("text", ["a"], "expected a JSON object"),
    ("chat", {"messages": []}, "at least one message"),
    ("chat", {"messages": [USER]}, "at least one assistant message"),
    ("chat", {"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    ("chat", {"messages": [USER, {"role": "assistant", "content": ""}]}, r"messages\[1\].content"),
    ("chat", {"messages": [USER, {"role": "assistant"}]}, "missing 'content'"),
    ("chat", {"messages": [USER, ASSISTANT, {"role": "system", "content": "x"}]}, "only come first"),
    ("chat", {"messages": [USER, ASSISTANT], "meta": [1]}, "field 'meta'"),
    ("prompt", {"prompt": [USER, ASSISTANT]}, "must end with a user message"),
    ("preference", {"prompt": [USER], "chosen": "a"}, "missing field 'rejected'"),
    ("preference", {"prompt": [USER], "chosen": 3, "rejected": "b"}, "expected a string"),
])
def test_bad_records_name_the_place_and_the_field(kind, obj, message):
  with pytest.raises(DataError, match=message) as e:
    schemas.validate(kind, obj, "data.jsonl:17")
  assert str(e.value).startswith("data.jsonl:17: ")


def test_unknown_kind():
  with pytest.raises(ValueError, match="unknown record kind"):
    schemas.validate("image", {}, "")


def test_lone_surrogates_are_rejected():
  with pytest.raises(DataError, match="not valid Unicode"):
    schemas.validate("text", {"text": "ok \ud800"}, "f:1")
