"""The stage contract: config, the CLI builder, the stage runner, artifacts and manifests, output
claims, integrity records, ranks, errors, logging and fault injection."""
