#!/usr/bin/env python
"""Convert an official dataset release once (``recyclelora-prepare``; see --help)."""

from recyclelora.cli.prepare import main

if __name__ == "__main__":
    raise SystemExit(main())
