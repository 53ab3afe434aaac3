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


class TiedLoraDataError(TiedLoraConfigError):
    """Training or validation data that NeMo would reject late or silently mistrain on.

    The message names the file, the line, the field and the fix.
    """


class TiedLoraGradientError(RuntimeError):
    """A non-finite (NaN/Inf) adapter gradient: the run stops before the optimizer writes it into the factors.

    The message names the step, the parameters and what to change.
    """
