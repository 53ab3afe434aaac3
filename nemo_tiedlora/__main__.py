"""``python -m nemo_tiedlora``: see :mod:`nemo_tiedlora.cli`."""

from nemo_tiedlora.cli import main

raise SystemExit(main())
