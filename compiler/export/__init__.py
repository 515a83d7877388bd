"""Exports of a compiled spiking model to other formats, one module per target: ``nir``
(the Neuromorphic Intermediate Representation). A new target goes in a module of its own
here, with its command in the CLI (compiler/cli/export.py)."""
