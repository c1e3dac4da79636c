"""`python -m edge_broker`: the same as the `edge-broker` command."""

from edge_broker.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
