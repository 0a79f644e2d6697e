"""Run a script under `accelerate launch` on CPU processes that see their true world: `python
accelerate_cpu_world.py SCRIPT ARGS...` as the launched program.

On a machine without a GPU, accelerate starts DeepSpeed with no backend of its own, and every process then believes
it is the only one (the main process, of a world of 1) while DeepSpeed's engine spans them all. Naming gloo as the
backend before the script makes its Accelerator gives each process its real rank and world, as on GPUs.
"""

import runpy
import sys

from accelerate import PartialState

if __name__ == "__main__":
    PartialState(backend="gloo")
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
