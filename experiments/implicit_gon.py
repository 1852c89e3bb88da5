"""Train an Implicit GON (GON-SPEC 2.4, 4.4): a SIREN space of images, latents from the origin step.

    python -m experiments.implicit_gon --dataset coil20 --manual-dir ../shared/data
"""
import sys

from experiments import cli


def main(argv=None) -> int:
    return cli.run("implicit_gon", __doc__.strip().splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
