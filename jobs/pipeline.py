"""The whole pipeline as a Ray job.

ray job submit ... -- python jobs/pipeline.py configs/breast_cancer.yaml [--set k=v]
"""

import sys

from dcml.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
