"""Turn a training checkpoint into an export directory: ``python export/merge_and_export.py``.

The command line is ``recyclelora-export`` (``recyclelora/cli/export.py``); ``--help`` lists it.
"""

import sys

from recyclelora.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
