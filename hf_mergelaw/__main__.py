"""``python -m hf_mergelaw`` runs the CLI."""

import sys

from hf_mergelaw.cli import main

sys.exit(main())
