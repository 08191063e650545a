"""`python -m skybroker`: the same as the `skybroker` console script."""

from skybroker.cli import main

if __name__ == "__main__":
    main()
