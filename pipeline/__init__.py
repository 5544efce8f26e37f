"""vaepipe: variational autoencoder scoring of tabular Parquet data, with exact log-densities."""

__version__ = "0.1.0"
