"""One module per command-line verb; each exposes ``main(argv) -> int`` (see :mod:`stlflow.cli`)."""
