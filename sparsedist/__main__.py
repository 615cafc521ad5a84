"""`python -m sparsedist` is the `sparsedist` command."""

import sys

from sparsedist.cli import main

if __name__ == "__main__":
    sys.exit(main())
