"""The tune stage as a Ray job:

ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
    -- python jobs/tune.py --config configs/breast_cancer.yaml [--set k=v ...]
"""

import sys

from dcml.job_entry import job_main

if __name__ == "__main__":
    sys.exit(job_main("tune"))
