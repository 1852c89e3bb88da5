"""gonjax: Gradient Origin Networks (Bond-Taylor & Willcocks, ICLR 2021) in JAX/Flax."""
__version__ = "0.1.0"
