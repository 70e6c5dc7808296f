"""Entry point: ``python -m jaxdit.cache`` (see :mod:`jaxdit.cli.cache`)."""
from jaxdit.cli.cache import run

if __name__ == "__main__":
    run()
