"""`python -m diffax ...` is the same as the `diffax` command."""
from diffax.cli import main

if __name__ == "__main__":
    main()
