"""Train a GON (GON-SPEC 4.1; --detach for 4.2) on one dataset, with evaluation, pictures and checkpoints.

    python -m experiments.gon --dataset fashion_mnist --manual-dir ../shared/data --epochs 1
"""
import sys

from experiments import cli


def main(argv=None) -> int:
    return cli.run("gon", __doc__.strip().splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
