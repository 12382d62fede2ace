"""`mergekit-yaml` with the fused methods registered, for environments without the .pth hook.

Usage: ``python -m mergekit_plugins config.yml ./merged [--cuda ...]``
"""

from mergekit.scripts.run_yaml import main

import mergekit_plugins  # noqa: F401  (registers the fused methods)

if __name__ == "__main__":
    main(prog_name="python -m mergekit_plugins")
