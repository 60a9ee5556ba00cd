"""Code that two or more stages use: config, artifacts, image io, logging, errors."""
