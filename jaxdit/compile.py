"""Entry point: ``python -m jaxdit.compile`` (see :mod:`jaxdit.cli.compile`)."""
from jaxdit.cli.compile import run

if __name__ == "__main__":
    run()
