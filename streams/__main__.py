"""Runs one faust worker of the processors: `python -m streams worker --without-web`."""

from streams.processors.app import create_app
from streams.runtime import tune_gc, tune_malloc
from streams.settings import Settings


def main() -> None:
    tune_malloc()
    tune_gc()
    create_app(Settings()).main()


if __name__ == "__main__":
    main()
