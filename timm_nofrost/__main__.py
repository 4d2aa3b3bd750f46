"""``python -m timm_nofrost``: the same as the ``timm-nofrost`` command."""
import sys

from .cli import main

sys.exit(main())
