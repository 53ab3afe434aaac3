"""``python -m nemo_tiedlora``: see :mod:`nemo_tiedlora.apps.cli`."""

from nemo_tiedlora.apps.cli import main

raise SystemExit(main())
