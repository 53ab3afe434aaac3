"""Tied-LoRA (arXiv 2311.09578 v2) parameter-efficient fine-tuning for NVIDIA NeMo and Megatron.

`import nemo_tiedlora` registers the `tiedlora` PEFT scheme with NeMo (lazily: NeMo is imported only by code that
uses it). The pure-torch core (`config`, `functional`, `modules`) needs torch alone.
"""

from nemo_tiedlora._autoregister import install as _install_nemo_registration

__version__ = "0.1.0"

_install_nemo_registration()
