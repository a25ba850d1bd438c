"""`python -m featurekit …` (and `torchrun --nproc_per_node=N -m featurekit train …`): the `featurekit` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
