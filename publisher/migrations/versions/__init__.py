"""One module per schema revision, named after its four-digit revision id."""
