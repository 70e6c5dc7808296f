"""Entry point: ``python -m jaxdit.eval`` (see :mod:`jaxdit.cli.eval`)."""
from jaxdit.cli.eval import run

if __name__ == "__main__":
    run()
