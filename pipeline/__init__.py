"""The build system: CLI, config and fingerprint, navigator, Ray workers, shards, publishing."""
