"""Development entry for Ray Serve: `serve run serve.app:app`.

Builds the OpenAI-compatible app from the pipeline config in $TAILORLM_CONFIG (default: the tiny
CPU config), serving the newest exported model of that run. `serve/config.yaml` is the same app
for `serve deploy` on a cluster.
"""

import os

from tailorlm.serving.app import build_from_args

app = build_from_args({"config": os.environ.get("TAILORLM_CONFIG", "jobs/configs/tiny_cpu.yaml")})
