"""`python -m fragment_llm` is the same as the `fragment` console script."""

from fragment_llm.cli.app import main

if __name__ == "__main__":
    main()
