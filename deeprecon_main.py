#!/usr/bin/env python
"""Run every Brain-Diffuser step for the deeprecon dataset (see --help, --list)."""
import sys

from pipeline.cli import dataset_main

if __name__ == "__main__":
    sys.exit(dataset_main("deeprecon"))
