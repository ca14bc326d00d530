"""Run the tailorlm whole pipeline as a Ray job:

ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/configs/tiny_cpu.yaml [KEY=VALUE ...]
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "platform"))

from tailorlm.jobs import entry  # noqa: E402

if __name__ == "__main__":
    sys.exit(entry("pipeline"))
