"""``python -m hfbconvert``: the same CLI as the ``hfbconvert`` command."""

from .cli import main

if __name__ == "__main__":  # pragma: no cover
    main(prog_name="hfbconvert")
