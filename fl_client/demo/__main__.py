"""`python -m fl_client.demo`: run the demo."""

import sys

from fl_client.demo.run import main

sys.exit(main())
