"""Entry point: ``python -m jaxdit.convert`` (see :mod:`jaxdit.cli.convert`)."""
from jaxdit.cli.convert import run

if __name__ == "__main__":
    run()
