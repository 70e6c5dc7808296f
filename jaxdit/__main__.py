"""Entry point: ``python -m jaxdit <command>``, the same as ``jaxdit <command>``."""
from jaxdit.cli.main import main

if __name__ == "__main__":
    main()
