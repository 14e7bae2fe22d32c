"""Errors users see. Each carries a message that says what is wrong and what to do."""


class WragError(Exception):
    """Base class: the CLI prints the message and exits non-zero; the server answers HTTP 400."""


class ShardError(WragError):
    """A shard (file, PEFT directory or in-memory) is malformed or not allowed."""


class StoreError(WragError):
    """A store operation was refused (unknown id, duplicate id, wrong base, wrong embedder...)."""


class ComposeError(WragError):
    """A composition request is invalid (weights, method, mismatched shards)."""
