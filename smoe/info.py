"""``python -m smoe.info``: print what was built (the report of :func:`smoe.info`)."""

from smoe._info import info

if __name__ == "__main__":
    info()
