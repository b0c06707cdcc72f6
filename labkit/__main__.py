"""``python -m labkit`` runs the command line, like the ``labkit`` script."""

import sys

from labkit.course.cli import main

sys.exit(main())
