"""``python -m ipylb``: the ``ipylb`` command."""

from .cli import main

if __name__ == "__main__":
    main()
