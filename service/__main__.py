"""`python -m sieve.service [--port P] [--no-worker]`: the same as `sieve serve`."""

import typer

from sieve.cli_service import serve

if __name__ == "__main__":
    typer.run(serve)
