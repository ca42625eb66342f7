"""Command-line tools that notebooks never import: sweeps and the engines that run them."""
