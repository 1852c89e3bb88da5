"""Train the VAE baseline (GON-SPEC 2.2, 4.5): BCE + KLD, samples from the prior every epoch.

    python -m experiments.vae --dataset fashion_mnist --manual-dir ../shared/data --epochs 5
"""
import sys

from experiments import cli


def main(argv=None) -> int:
    return cli.run("vae", __doc__.strip().splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
