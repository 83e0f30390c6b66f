"""``python -m fastdp train ...``: the same as the ``fastdp`` console script."""
from fastdp.cli import main

if __name__ == "__main__":
    main()
