"""JSON from untrusted input (shard headers, adapter configs, samples files): one place that turns
every way json.loads can fail into a WragError that names the input."""
from __future__ import annotations

import json

from .errors import WragError


def loads(text: str | bytes, where: str, error: type[WragError] = WragError):
    """json.loads(text), raising `error` "<where>: ..." for malformed JSON, JSON nested deeper than
    Python's recursion limit (RecursionError) or integers beyond Python's digit limit."""
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise error(f"{where}: invalid JSON ({e})") from None
