"""Generate a video (or a batch of them) with DualParal.

    python launch/generate.py --config ds_configs/tiny.json --output outputs/tiny.mp4
    deepspeed --num_gpus 8 launch/generate.py --config ds_configs/wan2.1-t2v-1.3b-480p.json --prompt "..."
    deepspeed --hostfile launch/hostfile.example launch/generate.py --config ... --jobs jobs.jsonl --output-dir out

`python launch/generate.py --help` lists every flag.
"""

import sys

from ds_dualparal.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
