"""Train the conv autoencoder baseline (GON-SPEC 2.2, 4.5): the GON loss on Dec(Enc(x)).

    python -m experiments.ae --dataset fashion_mnist --manual-dir ../shared/data --epochs 5
"""
import sys

from experiments import cli


def main(argv=None) -> int:
    return cli.run("ae", __doc__.strip().splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
