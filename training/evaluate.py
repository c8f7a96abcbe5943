"""Evaluate a trained checkpoint on the target domains (``recyclelora-eval``; see --help)."""

from recyclelora.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
