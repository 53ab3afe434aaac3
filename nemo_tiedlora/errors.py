"""Exceptions raised by nemo_tiedlora.

Every message names the cause and the fix, so a user can act on it without reading the code.
"""

from __future__ import annotations


class TiedLoraConfigError(ValueError):
    """A Tied-LoRA configuration is invalid, alone or for the model it is applied to.

    The message names the offending setting and the value to use instead.
    """


class TiedLoraCheckpointError(RuntimeError):
    """A Tied-LoRA adapter checkpoint does not match the model or is incomplete.

    The message names what is missing or mismatched (keys, shapes) and how to load it correctly.
    """
