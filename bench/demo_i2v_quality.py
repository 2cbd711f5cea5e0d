"""Image-to-video accuracy of the I2V demo model: the conditioning image must fix the object's
colour, shape and start position, the prompt ("moving left") its direction. Read back from the
decoded frames, for every trained and held-out combination, with controls that show the image is
what decides:

    python bench/demo_i2v_quality.py                  # seeds 0 1, with the controls
    python bench/demo_i2v_quality.py --seeds 0 --no-controls

- "image swap": the same prompt and seed with two images of different colours and shapes: both
  videos take their own image's colour (so the two differ).
- "blank image": a mid-grey image (no object) with the direction prompt: nothing to copy.
- "T2V demo, direction prompt": the text-to-video demo (models/demo/checkpoint) never sees the
  image: colour and shape at chance, start position wherever it likes.
- "T2V demo, full caption": the T2V demo told the colour and shape in words ("a red square moving
  left"): colour right, start position still not the image's.

Seconds are the median wall time per video on this machine (noisy on a shared CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.demo.data import train_combos  # noqa: E402
from models.demo.quality import (  # noqa: E402
    evaluate_i2v,
    evaluate_i2v_splits,
    evaluate_swap,
    format_i2v_scores,
    i2v_cases,
    runner_generate,
    runner_generate_i2v,
    swap_pairs,
    without_image,
)
from models.wan.t2v import blank_image  # noqa: E402
from serve.worker.model_runner import ModelRunner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
I2V_MODEL = ROOT / "models" / "demo" / "i2v_checkpoint"
T2V_MODEL = ROOT / "models" / "demo" / "checkpoint"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=I2V_MODEL, help="the I2V checkpoint")
    ap.add_argument("--t2v-model", type=Path, default=T2V_MODEL, help="the T2V demo, for the controls")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    ap.add_argument("--no-controls", action="store_true", help="only the I2V model's own accuracy")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"model {args.model}, seeds {seeds}")

    runner = ModelRunner.from_checkpoint(args.model)
    generate = runner_generate_i2v(runner)
    warm = i2v_cases(train_combos()[:1], [12345])[0]
    generate(warm.prompt, warm.image, warm.seed)  # first-call allocations
    scores = evaluate_i2v_splits(generate, seeds)
    print("\n== image-to-video: the image's colour/shape/start, the prompt's direction")
    print(format_i2v_scores(scores))
    if args.no_controls:
        return

    swap = evaluate_swap(generate, swap_pairs(seeds))
    print(
        f"\n== image swap ({swap.pairs} pairs: same prompt and seed, two images of different colour and shape)\n"
        f"both videos take their own image's colour: {swap.follow_rate:.1%}; "
        f"the two detected colours differ: {swap.differ_rate:.1%}"
    )

    cases = i2v_cases(train_combos(), seeds)
    blank = [dataclasses.replace(c, image=blank_image(c.image.height, c.image.width)) for c in cases]
    t2v = without_image(runner_generate(ModelRunner.from_checkpoint(args.t2v_model)))
    controls = {
        "I2V, this image": scores["trained"],
        "I2V, blank image": evaluate_i2v(generate, blank),
        "T2V, direction prompt": evaluate_i2v(t2v, cases),
        "T2V, full caption": evaluate_i2v(t2v, cases, prompt=lambda c: c.combo.caption),
    }
    print("\n== controls on the trained combinations (blank: scored against the case the image replaced)")
    print(format_i2v_scores(controls))


if __name__ == "__main__":
    main()
