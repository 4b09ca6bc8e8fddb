"""Parameter count and CPU cost of one training step of each real student.

    python benchmarks/student_speed.py [--threads 2] [--repeats 10]

Prints, per student: parameters, best-of-N forward+backward seconds (main head + KD head, as in
stage 2) and the same plus the AdamW step; images in the standard and the channels-last
layout, text with and without the frozen word-embedding matrix.
Images: batch 64 at the preset's 32 px; text: 16 texts x 40 tokens. Random inputs: the
cost does not depend on the values.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from zmdevice.students import build_student, count_parameters


def seconds(fn, repeats: int) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs after one warm-up run.

    The minimum, as ``timeit`` recommends: other processes on a shared laptop CPU only ever
    add time, so the fastest run is the closest to the true cost.
    """
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(name: str, inputs: dict, repeats: int, freeze: bool, channels_last: bool) -> dict:
    classes = [f"c{i}" for i in range(10)]
    student = build_student(name, classes).train()
    if channels_last:
        student.use_channels_last()
    student.attach_kd_head()
    targets = torch.randint(0, 10, (len(next(iter(inputs.values()))),))
    optimizer = torch.optim.AdamW(student.parameter_groups(1e-4, 1e-3, 0.01, freeze))

    def forward_backward():
        optimizer.zero_grad(set_to_none=True)
        features = student.features(**inputs)
        main, kd = student.head(features), student.kd_head(features)
        (F.cross_entropy(main, targets) + F.cross_entropy(kd, targets)).backward()

    def full_step():
        forward_backward()
        optimizer.step()

    trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    return {
        "student": name,
        "parameters": count_parameters(student) - count_parameters(student.kd_head),
        "trainable": trainable,  # heads included, the KD head too
        "forward_backward_s": seconds(forward_backward, repeats),
        "step_s": seconds(full_step, repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = {"pixel_values": torch.randn(64, 3, 32, 32)}
    tokens = {
        "input_ids": torch.randint(1000, 30000, (16, 40)),
        "attention_mask": torch.ones(16, 40, dtype=torch.int64),
    }
    runs = [
        ("mobilenet_v3_small", images, False, False),
        ("mobilenet_v3_small", images, False, True),
        ("distilbert", tokens, False, False),
        ("distilbert", tokens, True, False),
    ]
    for name, inputs, freeze, channels_last in runs:
        row = measure(name, inputs, args.repeats, freeze, channels_last)
        option = (
            f"frozen-embeddings={freeze}"
            if name == "distilbert"
            else (f"channels-last={channels_last}")
        )
        print(
            f"{row['student']:<20} {option:<24}"
            f" params {row['parameters']:>10,}"
            f"  trainable {row['trainable']:>10,}  fwd+bwd {row['forward_backward_s']:.3f} s"
            f"  fwd+bwd+AdamW {row['step_s']:.3f} s  (threads {args.threads})"
        )


if __name__ == "__main__":
    main()
