"""The one exception type for bad input data.

Every reader and validator raises `DataError` with a `where` that names the place a person
has to look (``path:line``, ``tfds:name[split][index]``, ``world[chat/train]``, ...), so a
message reads ``data.jsonl:17: field 'messages[2].role': expected one of ...``.
"""

from __future__ import annotations

from jaxlm.errors import UserError


class DataError(UserError, ValueError):
  """Input data that does not match what jaxlm expects.

  Attributes:
    where: the place of the bad input, e.g. ``"/data/chat.jsonl:17"``; may be empty.
    reason: what was wrong and what was expected.
  """

  def __init__(self, where: str, reason: str):
    self.where = where
    self.reason = reason
    super().__init__(f"{where}: {reason}" if where else reason)
