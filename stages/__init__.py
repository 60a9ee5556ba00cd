"""One module per `sdxl` command. Stages never import each other; they meet through artifacts."""
