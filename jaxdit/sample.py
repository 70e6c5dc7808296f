"""Entry point: ``python -m jaxdit.sample`` (see :mod:`jaxdit.cli.sample`)."""
from jaxdit.cli.sample import run

if __name__ == "__main__":
    run()
