"""Command-line side of nslora: reads params.yaml, parses options, calls the library.

Kept apart from the `nslora` package so the library never imports click or reads params.yaml.
"""
