"""Train with one of the paper's recipes (``recyclelora-train``; see --help)."""

from recyclelora.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
