"""`python -m fl_client`: the command line interface."""

import sys

from fl_client.cli import main

if __name__ == "__main__":
    sys.exit(main())
