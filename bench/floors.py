"""The two cold-start floors, run as a child process by bench/cold_start.py (kept apart from it so that the
fresh-process floor imports nothing but what a naive start would: Python, numpy, Paddle).

    python bench/floors.py fresh MODEL_DIR [--device cpu|gpu]   prints 'imported', 'created', then JSON timings
    python bench/floors.py warm MODEL_DIR [--device cpu|gpu]    prints 'ready', waits for a line on stdin,
                                                                 then 'created' and JSON timings

MODEL_DIR is a prepared model (manifest.json, the optimised program, golden inputs), the same files a worker
loads. The parent timestamps the lines of 'fresh', so Python's own start-up counts, as it does for a pod.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["fresh", "warm"])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    args = p.parse_args()
    use_gpu = args.device == "gpu"
    if args.mode == "fresh":
        import paddle.inference  # noqa: F401

        print("imported", flush=True)
    else:
        from runtime.engine import warm_up_device

        warm_up_device(use_gpu)  # exactly what a pool worker does before it is given a model
        print("ready", flush=True)
        sys.stdin.readline()
    import numpy as np

    from runtime.engine import PaddleInferenceEngine
    from runtime.spec import GOLDEN_INPUTS, Manifest

    t0 = time.perf_counter()
    # The same engine, settings and files as the worker's load (runtime.server.Worker.load).
    manifest = Manifest.load(args.model_dir)
    engine = PaddleInferenceEngine(args.model_dir, manifest, use_gpu=use_gpu, cpu_threads=1)
    t1 = time.perf_counter()
    print("created", flush=True)
    with np.load(args.model_dir / GOLDEN_INPUTS) as data:
        engine.infer({k: data[k] for k in data.files})
    t2 = time.perf_counter()
    print(json.dumps({"create_s": t1 - t0, "first_run_s": t2 - t1}), flush=True)


if __name__ == "__main__":
    main()
