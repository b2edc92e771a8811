"""`python -m proxy`: the same CLI as `llm-proxy`."""

import sys

from .cli import main

sys.exit(main())
