"""Data (GON-SPEC 6): `input_pipeline` prepares and reads the spec's datasets through TFDS (`builders`);
`batches` orders and batches arrays without TFDS. Import the submodule you need: importing this package
loads neither."""
