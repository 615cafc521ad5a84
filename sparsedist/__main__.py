"""`python -m sparsedist` is the `sparsedist` command."""

import sys

from sparsedist.cli import main

sys.exit(main())
