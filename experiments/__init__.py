"""Command-line experiments: thin wrappers that turn flags into a Config and call the trainer."""
