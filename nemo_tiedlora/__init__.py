"""Tied-LoRA (arXiv 2311.09578 v2) parameter-efficient fine-tuning for NVIDIA NeMo and Megatron.

`import nemo_tiedlora` registers the `tiedlora` PEFT scheme with NeMo (lazily: NeMo is imported only by code that
uses it; the entry is in ``PEFT_CONFIG_MAP`` as soon as ``nemo.collections.nlp.parts.peft_config`` is imported).
Layers, each a folder importing only from those before it: the pure-torch core (`nemo_tiedlora.core`: `config`,
`functional`, `autograd`, `modules`, ...), the file formats and layouts (`nemo_tiedlora.formats`, pure torch too), the
NeMo glue (`nemo_tiedlora.nemo`), the tools (`nemo_tiedlora.tools`), the applications (`nemo_tiedlora.apps`: `cli`,
`demo`, `study`, `bench`); `tests/unit/test_layers.py` checks it, and docs/design.md section 9 describes them.
"""

from nemo_tiedlora._autoregister import install as _install_nemo_registration

__version__ = "0.1.0"

_install_nemo_registration()
