"""Paddle Lite's own floor, run by bench/lite.py under the Lite interpreter (CPython 3.7: keep to 3.7 syntax and
to numpy + paddlelite): predictor creation and first run of a ``.nb``, in a process that has imported Lite.

    .venv-lite/bin/python bench/lite_floor.py MODEL.nb GOLDEN_INPUTS.npz   prints JSON timings (seconds)

The inputs are fed in the order of the model's input names, as the engine host does (runtime/lite/host.py).
"""

import json
import sys
import time


def main():
    nb, golden = sys.argv[1], sys.argv[2]
    t0 = time.perf_counter()
    import numpy as np
    from paddlelite import lite

    t1 = time.perf_counter()
    config = lite.MobileConfig()
    config.set_model_from_file(nb)
    predictor = lite.create_paddle_predictor(config)
    t2 = time.perf_counter()
    with np.load(golden) as data:
        inputs = {k: data[k] for k in data.files}
    t3 = time.perf_counter()
    for i, name in enumerate(predictor.get_input_names()):
        predictor.get_input(i).from_numpy(np.ascontiguousarray(inputs[name]))
    predictor.run()
    for i in range(len(predictor.get_output_names())):
        predictor.get_output(i).numpy()
    t4 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "create_s": t2 - t1, "first_run_s": t4 - t3}))


if __name__ == "__main__":
    main()
