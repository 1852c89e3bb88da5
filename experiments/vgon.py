"""Train a Variational GON (GON-SPEC 2.3, 4.3): origin step on BCE + KLD, samples from the prior every epoch.

    python -m experiments.vgon --dataset fashion_mnist --manual-dir ../shared/data --epochs 5
"""
import sys

from experiments import cli


def main(argv=None) -> int:
    return cli.run("vgon", __doc__.strip().splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
