"""``python -m ann2snn`` runs the CLI."""
from ann2snn.cli import main

main()
