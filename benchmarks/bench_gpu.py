"""GPU benchmark: fp32 against mixed precision for labeling and for both students' steps.

On a CUDA machine it measures, the variants alternating batch by batch in one process:

- labeling: images/s of the CLIP teacher (open_clip ViT-B-32 with random weights: the
  speed does not depend on the weights) through ``Teacher.predict_proba``, from pinned
  host batches as ``zmdevice label`` feeds it, fp32 and the ``auto`` mixed precision
  (bf16 where the GPU has it, else fp16);
- training: steps/s of one bare training step (forward + backward + AdamW, the gradient
  scaler for fp16) of mobilenet_v3_small (channels-last) and distilbert at the default
  stage-2 batch, fp32 and mixed.

Without CUDA it prints that nothing was measured and exits 0; ``--device cpu`` runs the same
code on the CPU (fp32 against bf16) with whatever models are named, which is how the tests
run it.

Usage::

    python benchmarks/bench_gpu.py                       # on a CUDA machine
    python benchmarks/bench_gpu.py --json gpu.json --batches 20 --steps 20
    python benchmarks/bench_gpu.py --device cpu --clip-arch NAME --students tiny-mobilenet
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_precision import alternate, student_rows, synchronize  # noqa: E402


def mixed_precision(device) -> str:
    """CUDA: what ``auto`` gives a transformer (bf16, or fp16 on GPUs without bf16); CPU:
    bf16, the only mixed precision torch runs there."""
    from zmdevice.precision import Hardware, choose_precision

    if device.type != "cuda":
        return "bf16"
    return choose_precision("auto", Hardware.probe(device), "transformer").name


def clip_rows(arch: str, device, batch_size: int, batches: int, precisions: list[str]):
    """Images/s of a randomly initialised CLIP teacher per precision, alternating."""
    import open_clip
    import torch

    from zmdevice.classes import ClassList
    from zmdevice.teachers import build_teacher

    classes = ClassList([f"class {i}" for i in range(10)], {})
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "random.pt"
        torch.manual_seed(0)
        torch.save(open_clip.create_model(arch, pretrained=None).state_dict(), checkpoint)
        teachers = {
            name: build_teacher(f"clip:{arch}:{checkpoint}", classes, device=device, precision=name)
            for name in precisions
        }
    size = open_clip.get_model_config(arch)["vision_cfg"]["image_size"]
    pin = torch.device(device).type == "cuda"
    images = torch.randn(batch_size, 3, size, size)
    images = images.pin_memory() if pin else images

    def timed(teacher):
        def run(_):
            synchronize(device)
            started = time.perf_counter()
            teacher.predict_proba(images)
            synchronize(device)
            return time.perf_counter() - started, None

        return run

    for teacher in teachers.values():
        teacher.predict_proba(images)  # warm-up: cuDNN/cuBLAS choose their kernels
    results = alternate({name: timed(t) for name, t in teachers.items()}, batches)
    seconds = {name: statistics.median(s for s, _ in runs) for name, runs in results.items()}
    return [
        {
            "teacher": f"clip:{arch} (random weights)",
            "device": str(device),
            "precision": name,
            "batch": batch_size,
            "images_per_s": batch_size / seconds[name],
            "speedup_vs_fp32": seconds["fp32"] / seconds[name],
        }
        for name in precisions
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--clip-arch", default="ViT-B-32")
    parser.add_argument("--batch-size", type=int, default=256, help="labeling batch")
    parser.add_argument("--batches", type=int, default=10, help="timed labeling batches")
    parser.add_argument(
        "--students", nargs="*", default=["mobilenet_v3_small", "distilbert"], help="presets"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per precision")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here: nothing measured (use --device cpu to run the code)")
        return 0
    device = torch.device(args.device)
    precisions = ["fp32", mixed_precision(device)]
    if device.type == "cuda":
        print(f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}")
    labeling = clip_rows(args.clip_arch, device, args.batch_size, args.batches, precisions)
    for row in labeling:
        print(
            f"  label {row['teacher']:<36} {row['precision']:<5} {row['images_per_s']:8.1f} "
            f"images/s (batch {row['batch']}) x{row['speedup_vs_fp32']:.2f} vs fp32"
        )
    training = []
    for name in args.students:
        rows = student_rows(name, args.steps, precisions, device)
        training += rows
        for row in rows:
            print(
                f"  train {name:<36} {row['precision']:<5} {1 / row['step_s']:8.2f} steps/s "
                f"(batch {row['batch']}) x{row['speedup_vs_fp32']:.2f} vs fp32"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {"device": str(device), "labeling": labeling, "training": training}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
