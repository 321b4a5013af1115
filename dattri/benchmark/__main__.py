"""``python -m dattri.benchmark`` runs the ``dattri-bench`` command."""

import sys

from dattri.benchmark.cli import main

sys.exit(main())
