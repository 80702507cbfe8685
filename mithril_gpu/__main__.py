"""`python -m mithril_gpu ...` is the `mithril` command."""
import sys

from .cli import main

sys.exit(main())
